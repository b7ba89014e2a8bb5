rule build_tiny_model:
    """A tiny pipeline of the named architecture, built from config with diffusers' classes."""
    output:
        directory(TINY_MODEL),
    log:
        f"{LOGS}/models/tiny-{{architecture}}.log",
    conda:
        "../../envs/lorachain.yaml"
    params:
        architecture="{architecture}",
        seed=config["model"].get("tiny_seed", 0),
        output_dir=lambda wildcards, output: output[0],
    script:
        "../scripts/build_tiny_model.py"
