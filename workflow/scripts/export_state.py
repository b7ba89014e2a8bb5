# Export a continual run's final state (lorachain.export.export_state_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.export:export_state_job")
