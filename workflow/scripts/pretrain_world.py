# The pretrain_world job of the miniature world (lorachain.world.jobs.pretrain_world_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.world.jobs:pretrain_world_job")
