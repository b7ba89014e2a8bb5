# Taking models out (lorachain.export, docs/export.md): `snakemake export` writes the final state of
# every continual run and every merge at its set's largest k as diffusers / kohya LoRA files (and
# fused U-Nets), as config block `export` says. Not part of `rule all`.
from lorachain.paths import EXPORT_DIR, MERGE_EXPORT_DIR


rule export_state:
    """Export a continual run's final state (exact where its method is a sum of low-rank terms)."""
    input:
        model_inputs,
        lambda wildcards: plan.chain_files(run_of(wildcards), config["domains"][wildcards.domain]["num_tasks"]),
        state=lambda wildcards: plan.final_state(config, run_of(wildcards)),
    output:
        out=directory(EXPORT_DIR),
    log:
        f"{LOGS}/{{domain}}/{{method}}/order{{order}}-seed{{seed}}/export.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/{{method}}/order{{order}}-seed{{seed}}/export.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    params:
        export=canonical(config["export"]),
        model=model_source(config),
    script:
        "../scripts/export_state.py"


rule export_merge:
    """Export merge label {merge} of the first k concepts (SVD where the merge is not low rank)."""
    input:
        model_inputs,
        merged_concept_files,
        merged_gram_files,
    output:
        out=directory(MERGE_EXPORT_DIR),
    log:
        f"{LOGS}/{{domain}}/modular/{{merge}}/k{{k}}-export.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{domain}}/modular/{{merge}}/k{{k}}-export.tsv"
    conda:
        "../../envs/lorachain.yaml"
    threads: 1
    params:
        concept_dirs=merged_concept_dirs,
        method=merge_method,
        merge_params=merge_block,
        merge="{merge}",
        export=canonical(config["export"]),
        model=model_source(config),
    script:
        "../scripts/export_merge.py"
