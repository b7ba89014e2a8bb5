rule sample_state:
    """Sample the model after task i of a run on every task j <= i (evaluation prompts, fixed noises),
    and on the composed prompts of every group of concepts it has learned."""
    input:
        model_inputs,
        state_chain_files,
        tasks=TASKS,
    output:
        samples=directory(SAMPLES_DIR),
        composition_samples=directory(COMPOSITIONS_DIR),
    log:
        f"{LOGS}/{RUN}/samples-after{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{RUN}/samples-after{{task}}.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        task_index=check_task_index,
        state_dir=state_dir,
        method=method_name,
        method_params=method_block,
        sampling=stage_block(config, "sampling"),
        revision=revision(config, "sampling"),
        model=model_source(config),
        vae=config["model"].get("vae"),
        run=run_identity,
        compositions=compositions_of,
    script:
        "../scripts/sample_state.py"


rule sample_base:
    """Sample the base model on every task of a domain (the reference line of the curves)."""
    input:
        model_inputs,
        tasks=reference_tasks,
    output:
        samples=directory(BASE_SAMPLES_DIR),
        composition_samples=directory(BASE_COMPOSITIONS_DIR),
    log:
        f"{LOGS}/{{domain}}/base/samples.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/base/samples.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        sampling=stage_block(config, "sampling"),
        revision=revision(config, "sampling"),
        model=model_source(config),
        vae=config["model"].get("vae"),
        domain="{domain}",
        compositions=compositions_of,
    script:
        "../scripts/sample_base.py"
