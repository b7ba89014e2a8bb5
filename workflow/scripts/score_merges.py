# Score the merged models of one merge label (lorachain.metrics.scoring.score_merges_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.metrics.scoring:score_merges_job")
