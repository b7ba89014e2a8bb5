# Merge the first k concepts and sample the merged model (lorachain.modular.merge_and_sample_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.modular:merge_and_sample_job")
