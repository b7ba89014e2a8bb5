# Export a merge of the first k concepts (lorachain.export.export_merge_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.export:export_merge_job")
