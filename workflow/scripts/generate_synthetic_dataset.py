# Generate a small dataset in a domain's native layout (lorachain.data.domains.generate_synthetic_dataset_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.data.domains:generate_synthetic_dataset_job")
