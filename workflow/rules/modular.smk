rule train_concept:
    """Train one concept of a domain independently from the base model (its index is its slot)."""
    input:
        model_inputs,
        tasks=reference_tasks,
        class_images=lambda wildcards: plan.class_images_input(config, wildcards.domain),
    output:
        state=f"{CONCEPT_DIR}/{STATE_FILE}",
        lora=f"{CONCEPT_DIR}/{LORA_FILE}",
        loss=f"{CONCEPT_DIR}/{LOSS_FILE}",
    log:
        f"{LOGS}/{{domain}}/modular/{{adapter}}/concept{{concept}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/modular/{{adapter}}/concept{{concept}}.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        concept_index=lambda wildcards: int(wildcards.concept),
        method=adapter_method,
        method_params=adapter_block,
        training=training_block(config),
        # how often to checkpoint does not change the result: a param derived from `output` is not
        # recorded by Snakemake, so changing training.checkpoint_every reruns nothing
        checkpoint_every=lambda wildcards, output: config["training"]["checkpoint_every"],
        # how a job is tracked (training.tracking) does not change its result either
        tracking=lambda wildcards, output: config["training"]["tracking"],
        # event files hold wall times: logs, beside the job's log, not results
        tracking_dir=concept_tracking_dir,
        revision=revision(config, "training"),
        model=model_source(config),
        vae=config["model"].get("vae"),
        seed=MODULAR.get("seed"),
        run=concept_identity,
    script:
        "../scripts/train_concept.py"


rule record_layer_inputs:
    """Gradient fusion's data: Gram matrices of every targeted layer's inputs in the concept's model,
    recorded as {recording} says (noised training images or a sampling trajectory; all token rows of
    the cross-attention K/V inputs or the concept's own)."""
    input:
        model_inputs,
        f"{CONCEPT_DIR}/{LORA_FILE}",
        tasks=reference_tasks,
        state=f"{CONCEPT_DIR}/{STATE_FILE}",
    output:
        grams=GRAMS,
        record=GRAMS_RECORD,
    log:
        f"{LOGS}/{{domain}}/modular/{{adapter}}/concept{{concept}}-grams-{{recording}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/modular/{{adapter}}/concept{{concept}}-grams-{{recording}}.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        concept_index=lambda wildcards: int(wildcards.concept),
        method=adapter_method,
        method_params=adapter_block,
        layer_inputs=canonical(MODULAR.get("layer_inputs", {})),
        recording="{recording}",
        target_modules=config["training"].get("target_modules"),
        resolution=config["training"]["resolution"],
        revision=revision(config, "training"),
        model=model_source(config),
        vae=config["model"].get("vae"),
    script:
        "../scripts/record_layer_inputs.py"


rule merge_and_sample:
    """Merge the first k concepts' LoRAs into the base model (timed) and sample it on those k concepts."""
    input:
        model_inputs,
        merged_concept_files,
        tasks=reference_tasks,
        grams=merged_gram_files,
        recordings=merged_gram_records,
    output:
        samples=directory(f"{MERGE_DIR}/samples"),
        composition_samples=directory(MERGE_COMPOSITIONS_DIR),
        record=f"{MERGE_DIR}/merge.json",
    log:
        f"{LOGS}/{{domain}}/modular/{{merge}}/k{{k}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/modular/{{merge}}/k{{k}}.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        method=merge_method,
        merge_params=merge_block,
        concept_dirs=merged_concept_dirs,
        sampling=stage_block(config, "sampling"),
        revision=revision(config, "sampling"),
        model=model_source(config),
        vae=config["model"].get("vae"),
        identity=merge_identity,
        merge="{merge}",
        eval_prompts=canonical(MODULAR.get("eval_prompts", {})),
        compositions=compositions_of,
    script:
        "../scripts/merge_and_sample.py"


rule score_merges:
    """Score every merged model of one merge label on its k concepts (one row per k, concept, metric)."""
    input:
        encoder_inputs,
        samples=merge_sample_dirs,
        compositions=merge_composition_dirs,
        references=REFERENCE_EMBEDDINGS,
        base_samples=BASE_SAMPLES_DIR,
    output:
        scores=MERGE_SCORES,
        composition_scores=MERGE_COMPOSITION_SCORES,
    log:
        f"{LOGS}/{{domain}}/modular/{{merge}}/scores.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/modular/{{merge}}/scores.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        metrics=metrics_of,
        encoders=encoder_blocks,
        revision=revision(config, "scoring"),
        batch_size=config["metrics"]["batch_size"],
    script:
        "../scripts/score_merges.py"


rule modular_results:
    """BlockLoRA's Table 1 (merge type, method, merge time, image/text alignment, average) for the
    largest k, and its Figure 5 (image alignment against the number of merged concepts)."""
    input:
        lambda wildcards: [path for paths in modular_results_inputs(wildcards).values() for path in paths],
    output:
        table=report(
            f"{MODULAR_TABLE}.csv", caption="../report/modular_table.rst", category="Modular", subcategory="{domain}"
        ),
        markdown=f"{MODULAR_TABLE}.md",
        points=MODULAR_POINTS,
        curve=report(
            f"{FIGURES}/modular-curve.png",
            caption="../report/modular_curve.rst",
            category="Modular",
            subcategory="{domain}",
        ),
        curve_pdf=f"{FIGURES}/modular-curve.pdf",
    log:
        f"{LOGS}/tables/{{domain}}-modular.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        scores=modular_scores,
        records=modular_records,
        merges=modular_merges(config),
        # the table's row order: derived from `input`, so not recorded (reordering the YAML reruns nothing)
        merge_order=lambda wildcards, input: list(MODULAR["merges"]),
        metrics=metrics_of,
        domain="{domain}",
        model=model_source(config),  # the provenance columns name its revision
    script:
        "../scripts/modular_results.py"


rule modular_prior_drift:
    """BlockLoRA's Figure 3 hypothesis, measured: how far each merge moves the class prior from the
    base model's (prior drift against the number of merged concepts k)."""
    input:
        points=MODULAR_POINTS,
    output:
        curve=report(
            f"{FIGURES}/modular-prior-drift.png",
            caption="../report/modular_prior_drift.rst",
            category="Modular",
            subcategory="{domain}",
        ),
        curve_pdf=f"{FIGURES}/modular-prior-drift.pdf",
    log:
        f"{LOGS}/tables/{{domain}}-modular-prior-drift.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        domain="{domain}",
        metric=lambda wildcards: plan.prior_metric(config, wildcards.domain),
    script:
        "../scripts/modular_prior_drift.py"


rule modular_ablation:
    """BlockLoRA's Table 3 as written: the merges of modular.ablation, one row each, with their
    adapters' parameters (no erasure, no blocks, neither, and BlockLoRA itself)."""
    input:
        table=f"{MODULAR_TABLE}.csv",
    output:
        ablation=report(
            f"{ABLATION_TABLE}.csv", caption="../report/ablation_table.rst", category="Modular", subcategory="{domain}"
        ),
        markdown=f"{ABLATION_TABLE}.md",
    log:
        f"{LOGS}/tables/{{domain}}-ablation.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        rows=MODULAR.get("ablation", []),
        domain="{domain}",
    script:
        "../scripts/modular_ablation.py"


rule lora_diagnostics:
    """BlockLoRA's Figure 4 for one adapter kind: layer-wise pairwise cosine similarity of the
    concepts' deltas, and the fraction of parameters with sign conflicts as LoRAs are added."""
    input:
        loras=diagnostics_loras,
    output:
        cosine_figure=report(
            f"{FIGURES}/diagnostics-{{adapter}}-cosine.png",
            caption="../report/diagnostics.rst",
            category="Modular",
            subcategory="{domain}",
        ),
        conflicts_figure=report(
            f"{FIGURES}/diagnostics-{{adapter}}-sign-conflicts.png",
            caption="../report/diagnostics.rst",
            category="Modular",
            subcategory="{domain}",
        ),
        cosine=f"{DIAGNOSTICS_DIR}/cosine.csv",
        conflicts=f"{DIAGNOSTICS_DIR}/sign_conflicts.csv",
    log:
        f"{LOGS}/{{domain}}/modular/{{adapter}}/diagnostics.log",
    conda:
        "../../envs/lorachain.yaml"
    script:
        "../scripts/lora_diagnostics.py"


rule modular_composition:
    """One composition of a modular set over every merge: a table (merge x metric) at the largest k
    and by k, a figure, and an image grid of its groups (subject x style) per merge and the base."""
    input:
        lambda wildcards: list(modular_composition_scores(wildcards).values()),
        lambda wildcards: list(modular_composition_samples(wildcards).values()),
        base_scores=BASE_COMPOSITION_SCORES,
        base_samples=BASE_COMPOSITIONS_DIR,
    output:
        table=report(
            f"{COMPOSITION_TABLE}.csv",
            caption="../report/composition_table.rst",
            category="Modular",
            subcategory="{domain}",
        ),
        markdown_table=f"{COMPOSITION_TABLE}.md",
        points=f"{COMPOSITION_TABLE}-by-k.csv",
        figure=report(
            f"{FIGURES}/composition-{{composition}}.png",
            caption="../report/composition_figure.rst",
            category="Modular",
            subcategory="{domain}",
        ),
        figure_pdf=f"{FIGURES}/composition-{{composition}}.pdf",
        grid=report(
            f"{FIGURES}/composition-{{composition}}-grid.png",
            caption="../report/composition_grid.rst",
            category="Modular",
            subcategory="{domain}",
        ),
    log:
        f"{LOGS}/tables/{{domain}}-composition-{{composition}}.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        scores=modular_composition_scores,
        samples=modular_composition_samples,
        # the rows' order: derived from `input`, so not recorded (reordering the YAML reruns nothing)
        merge_order=lambda wildcards, input: list(MODULAR["merges"]),
        composition="{composition}",
        domain="{domain}",
        model=model_source(config),  # the provenance columns name its revision
    script:
        "../scripts/modular_composition.py"
