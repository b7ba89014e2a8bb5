from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.models.tiny import save_tiny_pipeline

    save_tiny_pipeline(snakemake.wildcards.architecture, snakemake.output[0], seed=snakemake.params.seed, config_key="model.tiny")
