from lorachain.workflow_io import job_log

with job_log(snakemake.log[0]):
    from lorachain.data.domains import prepare_tasks

    tasks = prepare_tasks(
        snakemake.params.layout, snakemake.params.root, dict(snakemake.params.selection),
        int(snakemake.wildcards.order), snakemake.output[0], domain=snakemake.wildcards.domain,
    )
    for index, task in enumerate(tasks, start=1):
        print(f"task {index:02d}: {task.concept} <- {task.train_prompt!r} ({len(task.train_images)} images)")
