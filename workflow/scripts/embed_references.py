from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    import json

    from lorachain.metrics.scoring import embed_references_job
    from lorachain.torch_env import torch

    torch.set_num_threads(snakemake.threads)
    result = embed_references_job(
        tasks_file=snakemake.input.tasks,
        metrics=list(snakemake.params.metrics),
        encoder_blocks=dict(snakemake.params.encoders),
        batch_size=snakemake.params.batch_size,
        output=snakemake.output[0],
    )
    print(json.dumps(result, indent=2))
