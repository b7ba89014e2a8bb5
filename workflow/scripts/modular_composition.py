# One composition of a modular set over every merge (lorachain.report.composition.modular_composition_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.composition:modular_composition_job")
