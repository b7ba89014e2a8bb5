# Plot every merge's prior drift against k (lorachain.report.modular.modular_prior_drift_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.report.modular:modular_prior_drift_job")
