# Write the modular table and curve of a domain (lorachain.report.modular.modular_results_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.modular:modular_results_job")
