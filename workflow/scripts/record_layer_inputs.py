from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    import json
    from pathlib import Path

    from lorachain.data import read_tasks
    from lorachain.modular import record_layer_inputs
    from lorachain.torch_env import torch

    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    block = dict(params.layer_inputs)
    result = record_layer_inputs(
        model_source=params.model,
        vae=params.vae,
        state_dir=Path(snakemake.input.state).parent,
        method_name=params.method,
        method_params=dict(params.method_params),
        task=read_tasks(snakemake.input.tasks)[params.concept_index - 1],
        target_modules=list(params.target_modules),
        resolution=params.resolution,
        timesteps=block.get("timesteps", 10),
        seed=block.get("seed", 0),
        gram_dtype=block.get("gram_dtype", "float32"),
        output=snakemake.output[0],
    )
    print(json.dumps(result, indent=2))
