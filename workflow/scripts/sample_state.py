from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    import json

    from lorachain.sample import sample_after_task
    from lorachain.torch_env import torch

    torch.set_num_threads(snakemake.threads)
    params, base = snakemake.params, snakemake.rule == "sample_base"
    identity = (
        {"model": "base", "method": "base", "domain": snakemake.wildcards.domain, "order": "", "seed": "", "after_task": 0}
        if base
        else {**params.run, "model": params.run["method"], "method": params.method, "after_task": params.task_index}
    )
    timings = sample_after_task(
        tasks_file=snakemake.input.tasks,
        task_index=None if base else params.task_index,
        state_dir=None if base else params.state_dir,
        method_name=None if base else params.method,
        method_params=None if base else dict(params.method_params),
        sampling=dict(params.sampling),
        model_source=params.model,
        vae=params.vae,
        output_dir=snakemake.output[0],
        identity=identity,
    )
    print(json.dumps(timings, indent=2))
