from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.report.modular import modular_results_job

    modular_results_job(
        domain=snakemake.wildcards.domain,
        scores=dict(snakemake.params.scores),
        records=dict(snakemake.params.records),
        merges={label: dict(block) for label, block in snakemake.params.merges.items()},
        merge_order=list(snakemake.config["modular"]["merges"]),
        metrics=list(snakemake.params.metrics),
        table_csv=snakemake.output.table,
        table_md=snakemake.output.markdown,
        curve_stem=snakemake.output.curve.removesuffix(".png"),
    )
