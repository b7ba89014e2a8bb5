# Sample the state after task i of a run on tasks 1..i (lorachain.sample.sample_state_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.sample:sample_state_job")
