from lorachain.paths import PROVENANCE_TABLE
from lorachain.report import provenance as provenance_report


rule continual_table:
    """S, F (both conventions) and P per method and metric, mean and std over runs (and the
    composition metric's rows where the domain has compositions)."""
    input:
        lambda wildcards: list(domain_run_scores(wildcards).values()),
        lambda wildcards: list(domain_run_composition_scores(wildcards).values()),
        base_scores=BASE_SCORES,
        base_composition_scores=base_composition_scores,
    output:
        table=report(
            f"{TABLE}.csv",
            caption="../report/table.rst",
            category="Tables",
            labels={"domain": "{domain}", "format": "CSV"},
        ),
        markdown=f"{TABLE}.md",
        matrices=f"{MATRICES}",
    log:
        f"{LOGS}/tables/{{domain}}.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        run_scores=domain_run_scores,
        run_composition_scores=domain_run_composition_scores,
        # the rows' order (the config's): derived from `input`, so Snakemake does not record it and
        # reordering the YAML reruns nothing; a new or removed method changes the inputs
        methods=lambda wildcards, input: list(config["methods"]),
        metrics=metrics_of,
        num_tasks=lambda wildcards: domain(wildcards)["num_tasks"],
        orders=config["orders"],
        seeds=config["seeds"],
        domain="{domain}",
        model=model_source(config),  # the provenance columns name its revision
    script:
        "../scripts/continual_table.py"


rule plot_metric:
    """Heatmaps of a[j, i] per method and the first task's curve, for one domain and metric."""
    input:
        matrices=MATRICES,
        base_scores=BASE_SCORES,
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
    log:
        f"{LOGS}/figures/{{domain}}/{{metric}}.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        # the rows' order (the config's): derived from `input`, so Snakemake does not record it and
        # reordering the YAML reruns nothing; a new or removed method changes the inputs
        methods=lambda wildcards, input: list(config["methods"]),
        num_tasks=lambda wildcards: domain(wildcards)["num_tasks"],
        domain="{domain}",
        metric="{metric}",
    script:
        "../scripts/plot_metric.py"


rule image_grid:
    """One prompt and noise on the first task, across methods (rows) and tasks (columns)."""
    input:
        lambda wildcards: list(grid_sample_dirs(wildcards).values()),
        base_samples=BASE_SAMPLES_DIR,
    output:
        report(
            f"{FIGURES}/grid.png",
            caption="../report/grid.rst",
            category="Image grids",
            labels={"domain": "{domain}"},
        ),
    log:
        f"{LOGS}/figures/{{domain}}/grid.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        samples=grid_sample_dirs,
        # the rows' order (the config's): derived from `input`, so Snakemake does not record it and
        # reordering the YAML reruns nothing; a new or removed method changes the inputs
        methods=lambda wildcards, input: list(config["methods"]),
        grid=canonical(config["report"]["grid"]),
        run={"order": config["orders"][0], "seed": config["seeds"][0]},
        domain="{domain}",
        output=lambda wildcards, output: output[0],
    script:
        "../scripts/image_grid.py"


rule provenance_table:
    """Package versions, lorachain commit and model revision of every state and table of the run;
    a group of states (or the tables) produced by different versions is flagged `mixed`."""
    input:
        lambda wildcards: [path for files in provenance_report.state_groups(config).values() for path in files],
        tables=provenance_report.table_files(config),
    output:
        table=report(
            f"{PROVENANCE_TABLE}.csv",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"format": "CSV"},
        ),
        markdown_table=f"{PROVENANCE_TABLE}.md",
    log:
        f"{LOGS}/tables/run-provenance.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        # derived from `input`, so Snakemake does not record it: reordering the YAML reruns nothing
        states=lambda wildcards, input: provenance_report.state_groups(config),
    script:
        "../scripts/provenance_table.py"


rule loss_curves:
    """The training loss of every run of one domain, from its tasks' loss.csv (one figure per domain)."""
    input:
        lambda wildcards: list(plan.domain_loss_logs(config, wildcards.domain).values()),
    output:
        png=report(
            f"{FIGURES}/losses.png",
            caption="../report/losses.rst",
            category="Training loss",
            labels={"domain": "{domain}"},
        ),
        pdf=f"{FIGURES}/losses.pdf",
    log:
        f"{LOGS}/figures/{{domain}}/losses.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        loss_logs=lambda wildcards: plan.domain_loss_logs(config, wildcards.domain),
        # the panels' order (the config's): derived from `input`, so Snakemake does not record it and
        # reordering the YAML reruns nothing; a new or removed method changes the inputs
        methods=lambda wildcards, input: list(config["methods"]),
        domain="{domain}",
    script:
        "../scripts/loss_curves.py"
