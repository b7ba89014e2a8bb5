from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.report.results import continual_table_job

    table = continual_table_job(
        domain=snakemake.wildcards.domain,
        run_scores=dict(snakemake.params.runs),
        base_scores=snakemake.input.base,
        methods=list(snakemake.config["methods"]),  # config order; params hold the sorted set
        metrics=list(snakemake.params.metrics),
        num_tasks=snakemake.params.num_tasks,
        orders=list(snakemake.params.orders),
        seeds=list(snakemake.params.seeds),
        table_csv=snakemake.output.table,
        table_md=snakemake.output.markdown,
        matrices_csv=snakemake.output.matrices,
    )
    print(table.to_string())
