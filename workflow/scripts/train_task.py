# Train task t of one run on top of the state of task t-1 (lorachain.train.train_task_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.train:train_task_job")
