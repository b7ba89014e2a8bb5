# Score the base model's samples of a domain (lorachain.metrics.scoring.score_base_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.metrics.scoring:score_base_job")
