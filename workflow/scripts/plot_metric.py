from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from pathlib import Path

    from lorachain.report.results import plot_metric_job

    plot_metric_job(
        domain=snakemake.wildcards.domain,
        metric=snakemake.wildcards.metric,
        matrices_csv=snakemake.input.matrices,
        base_scores=snakemake.input.base,
        methods=list(snakemake.config["methods"]),  # config order; params hold the sorted set
        num_tasks=snakemake.params.num_tasks,
        heatmap_stem=Path(snakemake.output.heatmap).with_suffix(""),
        curve_stem=Path(snakemake.output.curve).with_suffix(""),
    )
