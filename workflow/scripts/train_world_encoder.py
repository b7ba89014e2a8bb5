# The train_world_encoder job of the miniature world (lorachain.world.jobs.train_world_encoder_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.world.jobs:train_world_encoder_job")
