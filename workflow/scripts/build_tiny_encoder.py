from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.metrics.encoders import save_tiny_encoder

    save_tiny_encoder(snakemake.wildcards.encoder, snakemake.output[0], seed=snakemake.params.seed)
