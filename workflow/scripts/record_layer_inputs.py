# Record the Gram matrices of one concept's layer inputs (lorachain.modular.record_layer_inputs_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.modular:record_layer_inputs_job")
