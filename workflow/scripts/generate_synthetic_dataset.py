from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.data.domains import generate_synthetic

    root = generate_synthetic(snakemake.params.layout, snakemake.output[0], snakemake.params.synthetic)
    print(f"generated a {snakemake.params.layout} dataset at {root}")
