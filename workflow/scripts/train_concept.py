from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    import json
    from pathlib import Path

    from lorachain.data import read_tasks
    from lorachain.modular import concept_seed
    from lorachain.torch_env import torch
    from lorachain.train import train_task

    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    task = read_tasks(snakemake.input.tasks)[params.concept_index - 1]
    manifest = train_task(
        model_source=params.model,
        vae=params.vae,
        train_images=list(task.train_images),
        train_prompt=task.train_prompt,
        task_index=1,  # trained from the base model, independently of the other concepts
        slot=params.concept_index - 1,
        previous_state=None,
        method_name=params.method,
        method_params=dict(params.method_params),
        training=dict(params.training, checkpoint_every=snakemake.config["training"]["checkpoint_every"]),
        seed=concept_seed(params.seed, params.concept_index),
        output_dir=Path(snakemake.output.state).parent,
        run=dict(params.run),
        concept=task.concept,
        loss_log=snakemake.output.loss,
    )
    print(json.dumps({k: manifest[k] for k in ("slot", "concept", "final_loss", "bytes_written", "timings")}, indent=2))
