# Plot the training loss of every run of one domain (lorachain.report.losses.loss_curves_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.losses:loss_curves_job")
