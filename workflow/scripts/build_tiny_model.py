# Build the tiny pipeline of one architecture (lorachain.models.tiny.build_tiny_model_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.models.tiny:build_tiny_model_job")
