from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    import json

    from lorachain.metrics.scoring import score_job
    from lorachain.torch_env import torch

    torch.set_num_threads(snakemake.threads)
    samples = snakemake.input.samples
    result = score_job(
        sample_dirs=[samples] if isinstance(samples, str) else list(samples),
        references=snakemake.input.references,
        metrics=list(snakemake.params.metrics),
        encoder_blocks=dict(snakemake.params.encoders),
        batch_size=snakemake.params.batch_size,
        output=snakemake.output[0],
    )
    print(json.dumps(result, indent=2))
