# The evaluate_world job of the miniature world (lorachain.world.jobs.evaluate_world_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.world.jobs:evaluate_world_job")
