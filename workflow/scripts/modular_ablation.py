# Lay out modular.ablation's merges as BlockLoRA's Table 3 (lorachain.report.modular.modular_ablation_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.modular:modular_ablation_job")
