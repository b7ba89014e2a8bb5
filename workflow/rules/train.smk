from lorachain.paths import CLASS_IMAGES_DIR


rule train_task:
    """Train task t of one run on top of the state left by task t-1 of the same run."""
    input:
        model_inputs,
        previous_task_files,
        tasks=TASKS,
        class_images=lambda wildcards: plan.class_images_input(config, wildcards.domain),
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
        # event files hold wall times: logs, beside the job's log, not results
        tracking_dir=task_tracking_dir,
        revision=revision(config, "training"),
        model=model_source(config),
        vae=config["model"].get("vae"),
        run=run_identity,
        seed=lambda wildcards: int(wildcards.seed),
    script:
        "../scripts/train_task.py"


rule class_images:
    """Prior preservation's class images of a domain: training.num_class_images base-model images
    of "a photo of a <class>" for every object class of its task pool, written once and read by
    every task, method, order and seed of the domain (only in the DAG with
    training.prior_preservation)."""
    input:
        model_inputs,
        tasks=reference_tasks,
    output:
        class_images=directory(CLASS_IMAGES_DIR),
    log:
        f"{LOGS}/{{domain}}/class_images.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/class_images.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        sampling=plan.class_images_params(config)["sampling"],
        num_class_images=plan.class_images_params(config)["num_class_images"],
        revision=revision(config, "training"),
        model=model_source(config),
        vae=config["model"].get("vae"),
    script:
        "../scripts/class_images.py"
