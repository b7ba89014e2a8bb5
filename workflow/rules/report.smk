rule continual_table:
    """S, F (both conventions) and P per method and metric, mean and std over runs."""
    input:
        runs=lambda wildcards: list(domain_run_scores(wildcards).values()),
        base=BASE_SCORES,
    output:
        table=report(
            f"{TABLE}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"domain": "{domain}", "format": "CSV"},
        ),
        markdown=f"{TABLE}.md",
        matrices=f"{MATRICES}",
    params:
        runs=domain_run_scores,
        methods=sorted(config["methods"]),  # the set; rows follow the config's order (read by the script)
        metrics=metrics_of,
        num_tasks=lambda wildcards: domain(wildcards)["num_tasks"],
        orders=config["orders"],
        seeds=config["seeds"],
    conda:
        "../../envs/lorachain.yaml"
    log:
        f"{LOGS}/tables/{{domain}}.log",
    script:
        "../scripts/continual_table.py"


rule plot_metric:
    """Heatmaps of a[j, i] per method and the first task's curve, for one domain and metric."""
    input:
        matrices=MATRICES,
        base=BASE_SCORES,
    output:
        heatmap=report(
            f"{FIGURES}/heatmap-{{metric}}.png",
            caption="../report/heatmap.rst",
            category="Heatmaps",
            labels={"domain": "{domain}", "metric": "{metric}"},
        ),
        heatmap_pdf=f"{FIGURES}/heatmap-{{metric}}.pdf",
        curve=report(
            f"{FIGURES}/curve-{{metric}}.png",
            caption="../report/curve.rst",
            category="First-task curves",
            labels={"domain": "{domain}", "metric": "{metric}"},
        ),
        curve_pdf=f"{FIGURES}/curve-{{metric}}.pdf",
    params:
        methods=sorted(config["methods"]),  # the set; rows follow the config's order (read by the script)
        num_tasks=lambda wildcards: domain(wildcards)["num_tasks"],
    conda:
        "../../envs/lorachain.yaml"
    log:
        f"{LOGS}/figures/{{domain}}/{{metric}}.log",
    script:
        "../scripts/plot_metric.py"


rule image_grid:
    """One prompt and noise on the first task, across methods (rows) and tasks (columns)."""
    input:
        runs=lambda wildcards: list(grid_sample_dirs(wildcards).values()),
        base=BASE_SAMPLES_DIR,
    output:
        report(
            f"{FIGURES}/grid.png",
            caption="../report/grid.rst",
            category="Image grids",
            labels={"domain": "{domain}"},
        ),
    params:
        samples=grid_sample_dirs,
        grid=canonical(config["report"]["grid"]),
        run={"order": config["orders"][0], "seed": config["seeds"][0]},
    conda:
        "../../envs/lorachain.yaml"
    log:
        f"{LOGS}/figures/{{domain}}/grid.log",
    script:
        "../scripts/image_grid.py"
