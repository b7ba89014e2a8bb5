from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.report.modular import diagnostics_job

    diagnostics_job(
        lora_files=list(snakemake.input),
        names=[f"concept {index}" for index in range(1, len(snakemake.input) + 1)],
        cosine_csv=snakemake.output.cosine,
        conflicts_csv=snakemake.output.conflicts,
        cosine_png=snakemake.output.cosine_figure,
        conflicts_png=snakemake.output.conflicts_figure,
    )
