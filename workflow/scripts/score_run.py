# Score every sample set of one run (lorachain.metrics.scoring.score_run_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.metrics.scoring:score_run_job")
