# Write the LoRA diagnostics of one adapter kind (lorachain.report.modular.lora_diagnostics_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.modular:lora_diagnostics_job")
