# Input functions and wildcard constraints. Paths live in lorachain.paths, what a config asks
# for in lorachain.plan, checks in lorachain.config_checks: rules and these functions only name them.
from lorachain import plan
from lorachain.metrics.catalog import ALL_METRICS, METRIC_ENCODER
from lorachain.paths import (
    ABLATION_TABLE,
    BASE_COMPOSITION_SCORES,
    BASE_COMPOSITIONS_DIR,
    BASE_SAMPLES_DIR,
    BASE_SCORES,
    COMPOSITION_TABLE,
    COMPOSITIONS_DIR,
    CONCEPT_DIR,
    CONCEPT_TRACKING,
    DIAGNOSTICS_DIR,
    FIGURES,
    GRAMS,
    GRAMS_RECORD,
    GRAMS_RECORD_FILE,
    LOGS,
    LORA_FILE,
    LOSS_FILE,
    MATRICES,
    MERGE_COMPOSITION_SCORES,
    MERGE_COMPOSITIONS_DIR,
    MERGE_DIR,
    MERGE_SCORES,
    MODULAR_POINTS,
    MODULAR_TABLE,
    REFERENCE_EMBEDDINGS,
    RESULTS,
    RUN,
    RUN_COMPOSITION_SCORES,
    RUN_SCORES,
    SAMPLES_DIR,
    STATE_FILE,
    SYNTHETIC_DATA,
    TABLE,
    TASKS,
    TASK_DIR,
    TASK_TRACKING,
    TINY_ENCODER,
    TINY_MODEL,
    WORLD_CSD,
    WORLD_ENCODER,
    WORLD_EVALUATION,
    WORLD_OBJECTS,
    WORLD_PIPELINE,
    WORLD_STYLES,
    state_files,
    task_dir,
)
from lorachain.plan import (
    canonical,
    merge_sizes,
    model_source,
    modular_merges,
    reference_order,
    revision,
    stage_block,
    training_block,
)

MODULAR = plan.modular(config)
WORLD = plan.world_block(config)


wildcard_constraints:
    domain="|".join([*config["domains"], *plan.modular_mixes(config)]),
    method="|".join(config["methods"]),
    order=r"-?\d+",
    seed=r"-?\d+",
    task=r"\d{2}",
    architecture="sd1|sdxl",
    metric="|".join(ALL_METRICS),
    encoder="|".join(sorted(set(METRIC_ENCODER.values()))),
    concept=r"\d\d",
    k=r"\d+",
    adapter="|".join(MODULAR.get("adapters", {})) or "(?!)",
    merge="|".join(MODULAR.get("merges", {})) or "(?!)",
    recording=plan.recording_pattern(),
    composition="|".join(config.get("compositions") or {}) or "(?!)",


def run_of(wildcards):
    return {key: getattr(wildcards, key) for key in ("domain", "method", "order", "seed")}


# ------------------------------------------------------------------------------ model and data


def model_inputs(wildcards):
    return plan.model_inputs(config)


def dataset_root(wildcards):
    return plan.dataset_root(config, wildcards.domain)


def dataset_inputs(wildcards):
    return plan.dataset_inputs(config, wildcards.domain)


def domain(wildcards):
    return config["domains"][wildcards.domain]


def selection_block(wildcards):
    return plan.selection_block(config, wildcards.domain)


def mix_task_files(wildcards):
    return list(plan.mix_task_files(config, wildcards.domain).values())


def reference_tasks(wildcards):
    return TASKS.format(domain=wildcards.domain, order=reference_order(config))


# ------------------------------------------------------------------------------ continual runs


def method_name(wildcards):
    return config["methods"][wildcards.method]["method"]


def method_block(wildcards):
    return plan.parameters_of(config["methods"][wildcards.method])


def check_task_index(wildcards):
    return plan.check_task_index(config, wildcards.domain, wildcards.task)


def previous_task_files(wildcards):
    """Task t reads the state chain of tasks 1..t-1 of the same run (it folds them on load)."""
    return plan.chain_files(run_of(wildcards), int(wildcards.task) - 1)


def previous_task_dir(wildcards):
    index = int(wildcards.task)
    return None if index == 1 else task_dir(**run_of(wildcards), task=index - 1)


def state_chain_files(wildcards):
    """Sampling after task i folds the chain of tasks 1..i of its run."""
    return plan.chain_files(run_of(wildcards), check_task_index(wildcards))


def state_dir(wildcards):
    return TASK_DIR.format(**wildcards)


def task_tracking_dir(wildcards, output):
    # `output` in the signature: Snakemake does not record the param, so moving logs reruns nothing
    return TASK_TRACKING.format(**dict(wildcards.items()))


def concept_tracking_dir(wildcards, output):
    return CONCEPT_TRACKING.format(**dict(wildcards.items()))


def run_identity(wildcards):
    return {**run_of(wildcards), "order": int(wildcards.order), "seed": int(wildcards.seed)}


# ------------------------------------------------------------------------------ scores and report


def metrics_of(wildcards):
    return plan.set_metrics(config, wildcards.domain)


def encoder_blocks(wildcards):
    return plan.encoder_blocks(config, wildcards.domain)


def encoder_inputs(wildcards):
    return plan.encoder_inputs(config, wildcards.domain)


def run_sample_dirs(wildcards):
    return plan.run_sample_dirs(config, run_of(wildcards))


def domain_run_scores(wildcards):
    return plan.domain_run_scores(config, wildcards.domain)


def grid_sample_dirs(wildcards):
    return plan.grid_sample_dirs(config, wildcards.domain)


# ------------------------------------------------------------------------------ compositions


def compositions_of(wildcards):
    return plan.compositions_of(config, wildcards.domain)


def run_composition_dirs(wildcards):
    return plan.run_composition_dirs(config, run_of(wildcards))


def domain_run_composition_scores(wildcards):
    return plan.domain_run_composition_scores(config, wildcards.domain)


def base_composition_scores(wildcards):
    """The base model's composition scores, where the domain has compositions."""
    return [BASE_COMPOSITION_SCORES.format(domain=wildcards.domain)] if compositions_of(wildcards) else []


def merge_composition_dirs(wildcards):
    return [
        MERGE_COMPOSITIONS_DIR.format(domain=wildcards.domain, merge=wildcards.merge, k=k)
        for k in merge_sizes(config, wildcards.domain)
    ]


def modular_composition_scores(wildcards):
    return canonical(
        {merge: MERGE_COMPOSITION_SCORES.format(domain=wildcards.domain, merge=merge) for merge in MODULAR["merges"]}
    )


def modular_composition_samples(wildcards):
    """The composition sample sets of every merge at the largest k (the grid's)."""
    k = merge_sizes(config, wildcards.domain)[-1]
    return canonical(
        {merge: MERGE_COMPOSITIONS_DIR.format(domain=wildcards.domain, merge=merge, k=k) for merge in MODULAR["merges"]}
    )


# ------------------------------------------------------------------------------ modular regime


def adapter_method(wildcards):
    return MODULAR["adapters"][wildcards.adapter]["method"]


def adapter_block(wildcards):
    return plan.parameters_of(MODULAR["adapters"][wildcards.adapter])


def concept_identity(wildcards):
    return {"domain": wildcards.domain, "method": wildcards.adapter, "regime": "modular", "seed": MODULAR["seed"]}


def merge_method(wildcards):
    return MODULAR["merges"][wildcards.merge]["method"]


def merge_block(wildcards):
    return plan.parameters_of(MODULAR["merges"][wildcards.merge], leave_out=("method", "adapters"))


def merged_concept_dirs(wildcards):
    return plan.merged_concept_dirs(config, wildcards.domain, wildcards.merge, int(wildcards.k))


def merged_concept_files(wildcards):
    return [path for directory in merged_concept_dirs(wildcards) for path in state_files(directory)]


def merged_gram_files(wildcards):
    return plan.merged_gram_files(config, wildcards.domain, wildcards.merge, int(wildcards.k))


def merged_gram_records(wildcards):
    return plan.merged_gram_files(
        config, wildcards.domain, wildcards.merge, int(wildcards.k), template=GRAMS_RECORD_FILE
    )


def merge_identity(wildcards):
    return {
        "model": wildcards.merge,
        "method": merge_method(wildcards),
        "domain": wildcards.domain,
        "order": reference_order(config),
        "seed": MODULAR["seed"],
        "after_task": int(wildcards.k),
    }


def merge_sample_dirs(wildcards):
    return [
        f"{MERGE_DIR.format(domain=wildcards.domain, merge=wildcards.merge, k=k)}/samples"
        for k in merge_sizes(config, wildcards.domain)
    ]


def modular_scores(wildcards):
    return canonical({merge: MERGE_SCORES.format(domain=wildcards.domain, merge=merge) for merge in MODULAR["merges"]})


def modular_records(wildcards):
    return canonical(
        {
            f"{merge}|{k}": f"{MERGE_DIR.format(domain=wildcards.domain, merge=merge, k=k)}/merge.json"
            for merge in MODULAR["merges"]
            for k in merge_sizes(config, wildcards.domain)
        }
    )


def modular_results_inputs(wildcards):
    return {"scores": list(modular_scores(wildcards).values()), "records": list(modular_records(wildcards).values())}


def diagnostics_loras(wildcards):
    return [
        f"{CONCEPT_DIR.format(domain=wildcards.domain, adapter=wildcards.adapter, concept=concept)}/{LORA_FILE}"
        for concept in plan.concept_labels(config, wildcards.domain)
    ]
