rule world_data:
    """The world's concepts: objects in the DreamBooth layout, styles in the UnlearnCanvas layout."""
    output:
        objects=directory(WORLD_OBJECTS),
        styles=directory(WORLD_STYLES),
    log:
        f"{LOGS}/world/data.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        world=WORLD,
        revision=plan.world_revision(),
    script:
        "../scripts/world_data.py"


rule pretrain_world:
    """The world's base model: a tiny SD-1.x pipeline pretrained on the world's captioned images."""
    output:
        output_dir=directory(WORLD_PIPELINE),
    log:
        f"{LOGS}/world/pipeline.log",
    benchmark:
        f"{RESULTS}/benchmarks/world/pipeline.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        world=WORLD,
        revision=plan.world_revision(),
        pretrain=plan.world_training(config, "pretrain"),
    script:
        "../scripts/pretrain_world.py"


rule train_world_encoder:
    """DINO or CLIP (transformers classes) trained on the world: identity, text agreement."""
    output:
        output=directory(WORLD_ENCODER),
    log:
        f"{LOGS}/world/{{encoder}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/world/{{encoder}}.tsv"
    wildcard_constraints:
        encoder="dino|clip",
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        world=WORLD,
        revision=plan.world_revision(),
        encoder="{encoder}",
        training=lambda wildcards: plan.world_training(config, "encoders", wildcards.encoder),
    script:
        "../scripts/train_world_encoder.py"


use rule train_world_encoder as train_world_csd with:
    output:
        output=WORLD_CSD,
    log:
        f"{LOGS}/world/csd.log",
    benchmark:
        f"{RESULTS}/benchmarks/world/csd.tsv"
    params:
        world=WORLD,
        revision=plan.world_revision(),
        encoder="csd",
        training=plan.world_training(config, "encoders", "csd"),


rule evaluate_world:
    """How often a held-out classifier recognises the prompted class in base samples, and each
    metric encoder's held-out accuracy on the world."""
    input:
        pipeline=WORLD_PIPELINE,
        dino=WORLD_ENCODER.format(encoder="dino"),
        clip=WORLD_ENCODER.format(encoder="clip"),
        csd=WORLD_CSD,
    output:
        evaluation=WORLD_EVALUATION,
        markdown=report(
            WORLD_EVALUATION.replace(".json", ".md"),
            caption="../report/world.rst",
            category="The miniature world",
        ),
    log:
        f"{LOGS}/world/evaluation.log",
    benchmark:
        f"{RESULTS}/benchmarks/world/evaluation.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        world=WORLD,
    script:
        "../scripts/evaluate_world.py"
