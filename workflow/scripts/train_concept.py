# Train one concept independently from the base model (lorachain.modular.train_concept_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.modular:train_concept_job")
