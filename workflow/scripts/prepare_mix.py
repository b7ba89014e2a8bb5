# Write a mixed concept set's task file (lorachain.modular.prepare_mix_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.modular:prepare_mix_job")
