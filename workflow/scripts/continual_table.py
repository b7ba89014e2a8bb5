# Write a domain's continual table and long matrix file (lorachain.report.results.continual_table_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.results:continual_table_job")
