from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.report.results import image_grid_job

    image_grid_job(
        domain=snakemake.wildcards.domain,
        samples={key: value for method in snakemake.config["methods"] for key, value in snakemake.params.samples.items() if key.split("|")[0] == method},  # config order
        base_samples=snakemake.input.base,
        prompt_index=snakemake.params.grid["prompt_index"],
        sample=snakemake.params.grid["sample"],
        run=dict(snakemake.params.run),
        output=snakemake.output[0],
    )
