rule build_tiny_encoder:
    """A tiny DINO, CLIP or CSD encoder with random weights, of the real classes (demo and tests)."""
    output:
        directory(TINY_ENCODER),
    log:
        f"{LOGS}/metrics/tiny-{{encoder}}.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        encoder="{encoder}",
        seed=lambda wildcards: config["metrics"][wildcards.encoder].get("tiny_seed", 0),
        output_dir=lambda wildcards, output: output[0],
    script:
        "../scripts/build_tiny_encoder.py"


rule embed_references:
    """Embed every task's reference images once per encoder; every scoring job reuses them."""
    input:
        encoder_inputs,
        tasks=reference_tasks,
    output:
        REFERENCE_EMBEDDINGS,
    log:
        f"{LOGS}/{{domain}}/references.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/references.tsv"
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
        references=lambda wildcards, output: output[0],
    script:
        "../scripts/embed_references.py"


rule score_run:
    """Score every sample set of one run: the T x T matrix a[j, i] of each metric."""
    input:
        encoder_inputs,
        samples=run_sample_dirs,
        compositions=run_composition_dirs,
        references=REFERENCE_EMBEDDINGS,
        base_samples=BASE_SAMPLES_DIR,
    output:
        scores=RUN_SCORES,
        composition_scores=RUN_COMPOSITION_SCORES,
    log:
        f"{LOGS}/{RUN}/scores.log",
    benchmark:
        f"{RESULTS}/benchmarks/{RUN}/scores.tsv"
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
        "../scripts/score_run.py"


rule score_base:
    """Score the base model's samples of a domain."""
    input:
        encoder_inputs,
        samples=BASE_SAMPLES_DIR,
        compositions=BASE_COMPOSITIONS_DIR,
        references=REFERENCE_EMBEDDINGS,
        base_samples=BASE_SAMPLES_DIR,
    output:
        scores=BASE_SCORES,
        composition_scores=BASE_COMPOSITION_SCORES,
    log:
        f"{LOGS}/{{domain}}/base/scores.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/base/scores.tsv"
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
        "../scripts/score_base.py"
