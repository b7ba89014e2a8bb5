# Select and order the tasks of one (domain, order seed) (lorachain.data.domains.prepare_tasks_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.data.domains:prepare_tasks_job")
