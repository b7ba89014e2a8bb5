# Build one tiny DINO, CLIP or CSD encoder (lorachain.metrics.encoders.build_tiny_encoder_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.metrics.encoders:build_tiny_encoder_job")
