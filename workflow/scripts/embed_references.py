# Embed the reference images of every task of a domain (lorachain.metrics.scoring.embed_references_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.metrics.scoring:embed_references_job")
