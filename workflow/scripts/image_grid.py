# Draw a domain's image grid (lorachain.report.results.image_grid_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.results:image_grid_job")
