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
    wildcard_constraints:
        domain="|".join(config["domains"]),
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


rule prepare_mix:
    """A mixed concept set of the modular regime: the first concepts of several domains, in order."""
    input:
        sources=mix_task_files,
    output:
        TASKS,
    log:
        f"{LOGS}/{{domain}}/tasks/order{{order}}.log",
    wildcard_constraints:
        domain="|".join(plan.modular_mixes(config)) or "(?!)",
    conda:
        "../../envs/lorachain.yaml"
    params:
        counts=lambda wildcards: [
            [domain, count] for domain, count in plan.modular_mixes(config)[wildcards.domain].items()
        ],
        mix="{domain}",
        order=lambda wildcards: int(wildcards.order),
        tasks=lambda wildcards, output: output[0],
    script:
        "../scripts/prepare_mix.py"
