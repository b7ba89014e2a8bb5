rule train_task:
    """Train task t of one run on top of the state left by task t-1 of the same run."""
    input:
        tasks=f"{RESULTS}/{{domain}}/tasks/order{{order}}.json",
        previous=previous_task_files,
        model=model_inputs,
    output:
        state=f"{TASK_DIR}/{TASK_FILES['state']}",
        lora=f"{TASK_DIR}/{TASK_FILES['lora']}",
        loss=f"{TASK_DIR}/{TASK_FILES['loss']}",
    params:
        task_index=check_task_index,
        previous_dir=previous_task_dir,
        method=method_name,
        method_params=method_block,
        training=training_block(config),
        revision=revision(config, "training"),
        model=model_source(config),
        vae=config["model"].get("vae"),
        run=run_identity,
    threads: 1
    resources:
        gpu=1,
    conda:
        "../../envs/lorachain.yaml"
    log:
        f"{LOGS}/{RUN}/task{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{RUN}/task{{task}}.tsv"
    script:
        "../scripts/train_task.py"
