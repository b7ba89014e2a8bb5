# Config lookups, input functions and wildcard constraints. Rules stay declarative.
import os

from lorachain.config_checks import MODEL_KEYS, check_model_sources
from lorachain.metrics.catalog import DEFAULT_METRICS, TINY_ENCODER_ENTRY, encoders_for

RESULTS = "results"
RESOURCES = "resources"
LOGS = "logs"
RUN = "{domain}/{method}/order{order}-seed{seed}"
TASK_DIR = f"{RESULTS}/{RUN}/task{{task}}"
TASK_FILES = {
    "state": "state.json",
    "lora": "pytorch_lora_weights.safetensors",
    "loss": "loss.csv",
}

DOMAINS = list(config["domains"])
METHODS = list(config["methods"])

for _name, _block in config["domains"].items():  # what the schema cannot compare
    if _block.get("task_pool") is not None and _block["task_pool"] < _block["num_tasks"]:
        raise ValueError(
            f"config key domains.{_name}.task_pool: {_block['task_pool']} is smaller than num_tasks {_block['num_tasks']}; "
            "the pool is what every order is drawn from (raise task_pool or remove it)"
        )


wildcard_constraints:
    domain="|".join(DOMAINS),
    method="|".join(METHODS),
    order=r"-?\d+",
    seed=r"-?\d+",
    task=r"\d{2}",
    architecture="sd1|sdxl",


def task_label(index):
    return f"{index:02d}"


# ------------------------------------------------------------------------------- params
# Snakemake records a rule's params by repr() and reruns a job when they differ. Every dict passed
# as a param goes through canonical(), so reordering or reformatting the YAML changes nothing;
# a rule gets only its own block, so a change reruns only what it affects.


def canonical(value):
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def stage_block(name, leave_out=()):
    return canonical({key: value for key, value in config[name].items() if key not in leave_out})


def training_block():
    """What a task's result depends on: everything in `training` but how often it checkpoints."""
    return stage_block("training", leave_out=("checkpoint_every",))


def revision(stage):
    """Code-change policy: editing the library or a script does not rerun anything (profiles set
    rerun-triggers without `code`); bumping `revisions.<stage>` in the config reruns that stage
    and everything downstream of it."""
    return config["revisions"][stage]


# ------------------------------------------------------------------------------ model


def model_source():
    """What training loads: a hub id / local directory, or the tiny pipeline the workflow builds."""
    model = config["model"]
    if "tiny" in model:
        return f"{RESOURCES}/models/tiny-{model['tiny']}"
    return model["pretrained"]


def model_inputs(wildcards):
    """The tiny model is built by a rule; a real model is read from its hub id or path by the job."""
    return [model_source()] if "tiny" in config["model"] else []


# ------------------------------------------------------------------------------- data


def domain(wildcards):
    return config["domains"][wildcards.domain]


def dataset_root(wildcards):
    dataset = domain(wildcards)["dataset"]
    if "synthetic" in dataset:
        return f"{RESOURCES}/data/synthetic-{wildcards.domain}"
    return dataset["root"]


def dataset_inputs(wildcards):
    """A generated dataset is a rule's output; a local copy is validated by prepare_tasks itself, so
    that the full grid can be dry-run on a machine without the data."""
    return [dataset_root(wildcards)] if "synthetic" in domain(wildcards)["dataset"] else []


def task_pool(block):
    """How many concepts are selected and ordered; runs train the first num_tasks of them."""
    return block.get("task_pool") or block["num_tasks"]


def selection_block(wildcards):
    """Only what the task selection reads, so other changes do not re-select. The selection is
    made for the pool (under the key `num_tasks` that the selection functions take), so raising
    num_tasks within the pool keeps every task file, and so every existing job, as it is."""
    block = domain(wildcards)
    keys = ("selection_seed", "concepts", "tokens", "train_images_per_style")
    return canonical({"num_tasks": task_pool(block), **{key: block[key] for key in keys if key in block}})


# ------------------------------------------------------------------------------ train


def method_block(wildcards):
    """The method's own parameters, without the `method` key."""
    block = config["methods"][wildcards.method]
    return canonical({key: value for key, value in block.items() if key != "method"})


def method_name(wildcards):
    return config["methods"][wildcards.method]["method"]


def previous_task_files(wildcards):
    """Task t reads the state chain of tasks 1..t-1 of the same run (it folds them on load)."""
    index = int(wildcards.task)
    run = RUN.format(**{k: getattr(wildcards, k) for k in ("domain", "method", "order", "seed")})
    return [
        f"{RESULTS}/{run}/task{task_label(previous)}/{name}"
        for previous in range(1, index)
        for name in (TASK_FILES["state"], TASK_FILES["lora"])
    ]


def previous_task_dir(wildcards):
    index = int(wildcards.task)
    if index == 1:
        return None
    run = RUN.format(**{k: getattr(wildcards, k) for k in ("domain", "method", "order", "seed")})
    return f"{RESULTS}/{run}/task{task_label(index - 1)}"


def check_task_index(wildcards):
    index = int(wildcards.task)
    num_tasks = domain(wildcards)["num_tasks"]
    if not 1 <= index <= num_tasks:
        raise ValueError(f"task {index} requested but domains.{wildcards.domain}.num_tasks is {num_tasks}")
    return index


def run_identity(wildcards):
    return {
        "domain": wildcards.domain,
        "method": wildcards.method,
        "order": int(wildcards.order),
        "seed": int(wildcards.seed),
    }


# ------------------------------------------------------------------------------ targets


def final_states():
    """The last task's state of every (domain, method, order, seed) run."""
    return [
        f"{RESULTS}/{name}/{method}/order{order}-seed{seed}/task{task_label(block['num_tasks'])}/{TASK_FILES['state']}"
        for name, block in config["domains"].items()
        for method in METHODS
        for order in config["orders"]
        for seed in config["seeds"]
    ]


# --------------------------------------------------------------------------- sample & score

SAMPLES_DIR = f"{RESULTS}/{RUN}/samples/after{{task}}"
BASE_SAMPLES_DIR = f"{RESULTS}/{{domain}}/base/samples"
REFERENCE_EMBEDDINGS = f"{RESULTS}/{{domain}}/references.safetensors"
RUN_SCORES = f"{RESULTS}/{RUN}/scores.csv"
BASE_SCORES = f"{RESULTS}/{{domain}}/base/scores.csv"
MATRICES = f"{RESULTS}/{{domain}}/matrices.csv"
TABLE = f"{RESULTS}/tables/{{domain}}"
FIGURES = f"{RESULTS}/figures/{{domain}}"
SCORING_RULES = {"embed_references", "score_run", "score_base"}


wildcard_constraints:
    metric="dino|clip_i|clip_t|csd",
    encoder="dino|clip|csd",
    concept=r"\d\d",
    k=r"\d+",


def reference_order():
    """Base samples and reference embeddings belong to concepts, not to an order: they are built
    from the first order's task list (every order holds the same concepts)."""
    return config["orders"][0]


def reference_tasks(wildcards):
    return f"{RESULTS}/{wildcards.domain}/tasks/order{reference_order()}.json"


def domain_metrics(name):
    block = config["domains"][name]
    return list(block.get("metrics") or DEFAULT_METRICS[block["dataset"]["layout"]])


def metrics_of(wildcards):
    return domain_metrics(wildcards.domain)


def domain_encoders(name):
    return encoders_for(domain_metrics(name))


def encoder_blocks(wildcards):
    """Loader blocks of the encoders a domain's metrics need; tiny ones point into resources/."""
    blocks = {}
    for name in domain_encoders(wildcards.domain):
        block = config["metrics"][name]
        if block.get("tiny"):
            key, entry = TINY_ENCODER_ENTRY[name]
            blocks[name] = {key: os.path.join(f"{RESOURCES}/metrics/tiny-{name}", entry)}
        else:
            blocks[name] = {MODEL_KEYS[name]: block[MODEL_KEYS[name]]}
    return canonical(blocks)


def encoder_inputs(wildcards):
    return [
        f"{RESOURCES}/metrics/tiny-{name}"
        for name in domain_encoders(wildcards.domain)
        if config["metrics"][name].get("tiny")
    ]


# Before any job, in the dry-run too: local model paths (the CSD checkpoint, a local base model)
# must exist, so a typo fails now instead of after hours of training and sampling.
check_model_sources(config, sorted({encoder for name in DOMAINS for encoder in domain_encoders(name)}))


def state_chain_files(wildcards):
    """Sampling after task i folds the chain of tasks 1..i of its run."""
    index = check_task_index(wildcards)
    run = RUN.format(**{k: getattr(wildcards, k) for k in ("domain", "method", "order", "seed")})
    return [
        f"{RESULTS}/{run}/task{task_label(task)}/{name}"
        for task in range(1, index + 1)
        for name in (TASK_FILES["state"], TASK_FILES["lora"])
    ]


def state_dir(wildcards):
    return TASK_DIR.format(**wildcards)


def run_sample_dirs(wildcards):
    """Every sample set of one run: after task 1..T."""
    return [
        SAMPLES_DIR.format(**{**wildcards, "task": task_label(task)})
        for task in range(1, domain(wildcards)["num_tasks"] + 1)
    ]


def domain_runs(name):
    return [(method, order, seed) for method in METHODS for order in config["orders"] for seed in config["seeds"]]


def domain_run_scores(wildcards):
    return canonical({
        f"{method}|{order}|{seed}": RUN_SCORES.format(domain=wildcards.domain, method=method, order=order, seed=seed)
        for method, order, seed in domain_runs(wildcards.domain)
    })


def grid_sample_dirs(wildcards):
    """The image grid shows the first run (first order, first seed) of every method."""
    order, seed = config["orders"][0], config["seeds"][0]
    return canonical({
        f"{method}|{task}": SAMPLES_DIR.format(domain=wildcards.domain, method=method, order=order, seed=seed, task=task_label(task))
        for method in METHODS
        for task in range(1, domain(wildcards)["num_tasks"] + 1)
    })


def domain_outputs(name):
    """Tables, figures and the image grid of one domain (what the report shows)."""
    outputs = [f"{TABLE.format(domain=name)}.csv", f"{TABLE.format(domain=name)}.md", f"{FIGURES.format(domain=name)}/grid.png"]
    for metric in domain_metrics(name):
        for kind in ("heatmap", "curve"):
            outputs += [f"{FIGURES.format(domain=name)}/{kind}-{metric}.{suffix}" for suffix in ("png", "pdf")]
    return outputs


def all_outputs():
    return [path for name in DOMAINS for path in domain_outputs(name)] + [path for name in MODULAR_DOMAINS for path in modular_outputs(name)]


# ------------------------------------------------------------------------------ modular regime

MODULAR = config.get("modular") or {}
MODULAR_DOMAINS = [name for name in DOMAINS if MODULAR and (MODULAR.get("domains") is None or name in MODULAR["domains"])]
ADAPTERS = list(MODULAR.get("adapters", {}))
MERGES = list(MODULAR.get("merges", {}))
MODULAR_DIR = f"{RESULTS}/{{domain}}/modular"


if MODULAR:

    wildcard_constraints:
        adapter="|".join(ADAPTERS),
        merge="|".join(MERGES),


CONCEPT_DIR = f"{MODULAR_DIR}/adapters/{{adapter}}/concept{{concept}}"
GRAMS = f"{CONCEPT_DIR}/grams.safetensors"
MERGE_DIR = f"{MODULAR_DIR}/merges/{{merge}}/k{{k}}"
MERGE_SCORES = f"{MODULAR_DIR}/merges/{{merge}}/scores.csv"
MODULAR_TABLE = f"{RESULTS}/tables/{{domain}}-modular"
DIAGNOSTICS_DIR = f"{MODULAR_DIR}/diagnostics/{{adapter}}"


def check_modular_config():
    """What the schema cannot compare: labels that exist, concept counts within the pool and the
    block count, merge sizes within the concepts."""
    if not MODULAR:
        return
    where = "config key modular"
    for name in MODULAR.get("domains") or []:
        if name not in DOMAINS:
            raise ValueError(f"{where}.domains: {name!r} is not a domain (domains: {', '.join(DOMAINS)})")
    concepts = MODULAR["concepts"]
    for name in MODULAR_DOMAINS:
        pool = task_pool(config["domains"][name])
        if concepts > pool:
            raise ValueError(f"{where}.concepts: {concepts} concepts but domain {name!r} selects {pool} (raise domains.{name}.task_pool or lower modular.concepts)")
    for k in MODULAR.get("merge_sizes") or []:
        if k > concepts:
            raise ValueError(f"{where}.merge_sizes: k = {k} exceeds modular.concepts = {concepts}")
    for label, block in MODULAR["adapters"].items():
        blocks = block.get("num_blocks")
        if block.get("blockwise", True) and blocks is not None and blocks < concepts:
            raise ValueError(
                f"{where}.adapters.{label}.num_blocks: {blocks} row blocks for {concepts} concepts; every concept needs its own block (raise num_blocks to >= {concepts})"
            )
    for label, block in MODULAR["merges"].items():
        if block["adapters"] not in MODULAR["adapters"]:
            raise ValueError(f"{where}.merges.{label}.adapters: {block['adapters']!r} is not a label under modular.adapters ({', '.join(ADAPTERS)})")


check_modular_config()
for _label, _block in config["methods"].items():  # a chain's task t uses slot t - 1
    if _block.get("blockwise", True) and _block.get("num_blocks") is not None:
        _longest = max(config["domains"][name]["num_tasks"] for name in DOMAINS)
        if _block["num_blocks"] < _longest:
            raise ValueError(f"config key methods.{_label}.num_blocks: {_block['num_blocks']} row blocks for chains of {_longest} tasks (raise it to >= {_longest})")


def merge_sizes():
    return list(MODULAR.get("merge_sizes") or range(1, MODULAR["concepts"] + 1))


def concept_labels():
    return [task_label(index) for index in range(1, MODULAR["concepts"] + 1)]


def adapter_block(wildcards):
    block = MODULAR["adapters"][wildcards.adapter]
    return canonical({key: value for key, value in block.items() if key != "method"})


def adapter_method(wildcards):
    return MODULAR["adapters"][wildcards.adapter]["method"]


def concept_identity(wildcards):
    return {"domain": wildcards.domain, "method": wildcards.adapter, "regime": "modular", "seed": MODULAR["seed"]}


def merge_block(wildcards):
    block = MODULAR["merges"][wildcards.merge]
    return canonical({key: value for key, value in block.items() if key not in ("method", "adapters")})


def merge_method(wildcards):
    return MODULAR["merges"][wildcards.merge]["method"]


def merge_needs_layer_inputs(name):
    from lorachain.merge_catalog import NEEDS_LAYER_INPUTS

    return name in NEEDS_LAYER_INPUTS


def merged_concept_dirs(wildcards):
    adapter = MODULAR["merges"][wildcards.merge]["adapters"]
    return [CONCEPT_DIR.format(domain=wildcards.domain, adapter=adapter, concept=task_label(index)) for index in range(1, int(wildcards.k) + 1)]


def merged_concept_files(wildcards):
    return [f"{directory}/{TASK_FILES[name]}" for directory in merged_concept_dirs(wildcards) for name in ("state", "lora")]


def merged_gram_files(wildcards):
    if not merge_needs_layer_inputs(merge_method(wildcards)):
        return []
    return [f"{directory}/grams.safetensors" for directory in merged_concept_dirs(wildcards)]


def merge_identity(wildcards):
    return {"model": wildcards.merge, "method": merge_method(wildcards), "domain": wildcards.domain, "order": reference_order(), "seed": MODULAR["seed"], "after_task": int(wildcards.k)}


def merge_sample_dirs(wildcards):
    return [f"{MERGE_DIR.format(domain=wildcards.domain, merge=wildcards.merge, k=k)}/samples" for k in merge_sizes()]


def modular_scores(wildcards):
    return canonical({merge: MERGE_SCORES.format(domain=wildcards.domain, merge=merge) for merge in MERGES})


def modular_records(wildcards):
    return canonical({f"{merge}|{k}": f"{MERGE_DIR.format(domain=wildcards.domain, merge=merge, k=k)}/merge.json" for merge in MERGES for k in merge_sizes()})


def modular_results_inputs(wildcards):
    return {"scores": list(modular_scores(wildcards).values()), "records": list(modular_records(wildcards).values())}


def modular_merges():
    """The table's rows: each merge label's method and the adapters it merges (sorted by label)."""
    return canonical({label: {"method": block["method"], "adapters": block["adapters"]} for label, block in MODULAR.get("merges", {}).items()})


def diagnostics_loras(wildcards):
    return [f"{CONCEPT_DIR.format(domain=wildcards.domain, adapter=wildcards.adapter, concept=c)}/{TASK_FILES['lora']}" for c in concept_labels()]


def modular_outputs(name):
    outputs = [f"{MODULAR_TABLE.format(domain=name)}.{suffix}" for suffix in ("csv", "md")]
    outputs += [f"{FIGURES.format(domain=name)}/modular-curve.{suffix}" for suffix in ("png", "pdf")]
    if MODULAR["concepts"] >= 2:
        outputs += [f"{FIGURES.format(domain=name)}/diagnostics-{adapter}-{kind}.png" for adapter in ADAPTERS for kind in ("cosine", "sign-conflicts")]
    return outputs


# ------------------------------------------------------------------------------ cluster


def _resource_names(resources):
    """Names set in a Snakemake resources mapping (profile default-resources / set-resources)."""
    if resources is None:
        return set()
    try:
        return set(resources.keys())
    except (AttributeError, TypeError):
        return {str(item).split("=", 1)[0] for item in resources}


def _resource_value(resources, name):
    """A resource's value from a rule's resources or a profile mapping (None if unset; the text of
    an expression that only a job can evaluate)."""
    try:
        resource = resources.get(name)
    except (AttributeError, TypeError):
        return None
    if hasattr(resource, "is_evaluable"):
        try:
            # A profile's strings are kept as expressions; their text is the value for names and counts.
            return getattr(resource, "raw", None) if resource.is_evaluable() else resource.value
        except ValueError:
            return None
    return resource


def _slurm_query(*command):
    import subprocess

    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise ValueError(f"SLURM executor: `{' '.join(command)}` failed ({error}); is this a SLURM login node?") from None


def check_cluster_settings():
    """Under the SLURM executor, before anything is submitted: an account (or slurm-no-account),
    partitions that exist, and GPUs on the cluster for the rules that request one. The plugin
    would otherwise guess an account and submit jobs that pend or fail one by one."""
    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm":
        return
    settings = workflow.resource_settings
    defaults = _resource_names(settings.default_resources)
    overrides = {name: _resource_names(mapping) for name, mapping in settings.overwrite_resources.items()}
    no_account = bool(getattr(workflow.executor_settings, "no_account", False))
    problems = []
    if not no_account and "slurm_account" not in defaults:
        missing = sorted(step.name for step in workflow.rules if step.name != "all" and "slurm_account" not in overrides.get(step.name, set()))
        if missing:
            problems.append(
                "no SLURM account: set default-resources.slurm_account in the profile (profiles/slurm/config.yaml; "
                "`sacctmgr -n -s list user $USER format=account` lists yours) or `slurm-no-account: true` "
                f"(rules without one: {', '.join(missing)})"
            )
    partitions = set(_slurm_query("sinfo", "-h", "-o", "%R").split())
    default_partition = any(line.strip().endswith("*") for line in _slurm_query("sinfo", "-h", "-o", "%P").splitlines())
    gres_by_partition = {}
    for line in _slurm_query("sinfo", "-h", "-o", "%R %G").splitlines():
        name, _, gres = line.partition(" ")
        gres_by_partition[name] = gres_by_partition.get(name, "") + gres
    for step in workflow.rules:
        if step.name == "all":
            continue
        sources = (settings.overwrite_resources.get(step.name), step.resources, settings.default_resources)
        partition = next((value for value in (_resource_value(source, "slurm_partition") for source in sources) if value is not None), None)
        if isinstance(partition, str):
            partition = partition.strip("'\"")
        if isinstance(partition, str) and partition not in partitions:
            problems.append(f"{step.name}: slurm_partition {partition!r} does not exist on this cluster (sinfo lists {', '.join(sorted(partitions))})")
        if partition is None and not default_partition and "slurm_partition" not in defaults | overrides.get(step.name, set()):
            problems.append(f"{step.name}: no slurm_partition and the cluster has no default partition; set one in the profile's set-resources")
        gpu = next((value for value in (_resource_value(source, "gpu") for source in sources[:2]) if value is not None), 0)
        gpu = int(gpu) if isinstance(gpu, str) and gpu.strip().isdigit() else gpu
        if isinstance(gpu, int) and gpu > 0:
            where = [partition] if isinstance(partition, str) else list(gres_by_partition)
            if not any("gpu" in gres_by_partition.get(name, "") for name in where):
                problems.append(
                    f"{step.name} requests gpu={gpu} but no node of partition(s) {', '.join(where) or '(none)'} has a GPU GRES "
                    "(sinfo -o '%R %G'); name a GPU partition with slurm_partition in the profile's set-resources"
                )
    if problems:
        raise ValueError("SLURM profile check failed before any job was submitted:\n  " + "\n  ".join(problems))
