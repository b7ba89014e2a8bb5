# The world_data job of the miniature world (lorachain.world.jobs.world_data_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.world.jobs:world_data_job")
