# Sample the base model on every task of a domain (lorachain.sample.sample_base_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.sample:sample_base_job")
