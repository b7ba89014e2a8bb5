from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.metrics.encoders import save_tiny_encoder

    name = snakemake.wildcards.encoder
    save_tiny_encoder(name, snakemake.output[0], seed=snakemake.params.seed, config_key=f"metrics.{name}.tiny")
