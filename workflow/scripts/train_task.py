from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    import json
    from pathlib import Path

    from lorachain.data import read_tasks
    from lorachain.torch_env import torch
    from lorachain.train import train_task

    torch.set_num_threads(snakemake.threads)
    index = snakemake.params.task_index
    task = read_tasks(snakemake.input.tasks)[index - 1]
    manifest = train_task(
        model_source=snakemake.params.model,
        vae=snakemake.params.vae,
        train_images=list(task.train_images),
        train_prompt=task.train_prompt,
        task_index=index,
        previous_state=snakemake.params.previous_dir,
        method_name=snakemake.params.method,
        method_params=dict(snakemake.params.method_params),
        # how often to checkpoint does not change the result, so it is not a param (no rerun)
        training=dict(snakemake.params.training, checkpoint_every=snakemake.config["training"]["checkpoint_every"]),
        seed=int(snakemake.wildcards.seed),
        output_dir=Path(snakemake.output.state).parent,
        run=dict(snakemake.params.run),
        concept=task.concept,
        loss_log=snakemake.output.loss,
    )
    print(json.dumps({k: manifest[k] for k in ("task_index", "concept", "final_loss", "bytes_written", "timings")}, indent=2))
