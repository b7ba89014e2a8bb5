# Write the run's provenance table (lorachain.report.provenance.provenance_table_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.provenance:provenance_table_job")
