# Plot one metric's heatmaps and first-task curve (lorachain.report.results.plot_metric_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.results:plot_metric_job")
