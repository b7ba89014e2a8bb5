# Prior preservation's class images of one domain (lorachain.training.prior.class_images_job).
from lorachain.workflow_io import run_job

run_job(snakemake, "lorachain.training.prior:class_images_job")
