rule generate_synthetic_dataset:
    """A small generated dataset in the domain's native layout (demo and tests)."""
    output:
        directory(SYNTHETIC_DATA),
    log:
        f"{LOGS}/data/synthetic-{{domain}}.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        layout=lambda wildcards: domain(wildcards)["dataset"]["layout"],
        synthetic=lambda wildcards: canonical(domain(wildcards)["dataset"]["synthetic"]),
        root=lambda wildcards, output: output[0],
    script:
        "../scripts/generate_synthetic_dataset.py"


rule prepare_tasks:
    """Validate the dataset, select the tasks the reference's way and order them by the order seed."""
    input:
        dataset_inputs,
    output:
        TASKS,
    log:
        f"{LOGS}/{{domain}}/tasks/order{{order}}.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        layout=lambda wildcards: domain(wildcards)["dataset"]["layout"],
        root=dataset_root,
        selection=selection_block,
        order=lambda wildcards: int(wildcards.order),
        domain="{domain}",
        tasks=lambda wildcards, output: output[0],
    script:
        "../scripts/prepare_tasks.py"
