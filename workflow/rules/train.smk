rule train_task:
    """Train task t of one run on top of the state left by task t-1 of the same run."""
    input:
        model_inputs,
        previous_task_files,
        tasks=TASKS,
    output:
        state=f"{TASK_DIR}/{STATE_FILE}",
        lora=f"{TASK_DIR}/{LORA_FILE}",
        loss=f"{TASK_DIR}/{LOSS_FILE}",
    log:
        f"{LOGS}/{RUN}/task{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{RUN}/task{{task}}.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        task_index=check_task_index,
        previous_dir=previous_task_dir,
        method=method_name,
        method_params=method_block,
        training=training_block(config),
        # how often to checkpoint does not change the result: a param derived from `output` is not
        # recorded by Snakemake, so changing training.checkpoint_every reruns nothing
        checkpoint_every=lambda wildcards, output: config["training"]["checkpoint_every"],
        # how a job is tracked (training.tracking) does not change its result either
        tracking=lambda wildcards, output: config["training"]["tracking"],
        revision=revision(config, "training"),
        model=model_source(config),
        vae=config["model"].get("vae"),
        run=run_identity,
        seed=lambda wildcards: int(wildcards.seed),
    script:
        "../scripts/train_task.py"
