from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    import json

    from lorachain.modular import merge_and_sample
    from lorachain.torch_env import torch

    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    result = merge_and_sample(
        concept_dirs=list(params.concept_dirs),
        gram_files=list(snakemake.input.grams) or None,
        merge_name=params.method,
        merge_params=dict(params.merge_params),
        merge_key=f"modular.merges.{snakemake.wildcards.merge}",
        tasks_file=snakemake.input.tasks,
        sampling=dict(params.sampling),
        model_source=params.model,
        vae=params.vae,
        output_dir=snakemake.output.samples,
        identity=dict(params.identity),
        merge_record=snakemake.output.record,
    )
    print(json.dumps(result, indent=2))
