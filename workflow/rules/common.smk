# Config lookups, input functions and wildcard constraints. Rules stay declarative.
import os

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


def selection_block(wildcards):
    """Only what the task selection reads, so other changes do not re-select."""
    block = domain(wildcards)
    keys = ("num_tasks", "selection_seed", "concepts", "tokens", "train_images_per_style")
    return canonical({key: block[key] for key in keys if key in block})


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
            blocks[name] = {key: value for key, value in block.items() if key != "tiny"}
    return canonical(blocks)


def encoder_inputs(wildcards):
    return [
        f"{RESOURCES}/metrics/tiny-{name}"
        for name in domain_encoders(wildcards.domain)
        if config["metrics"][name].get("tiny")
    ]


def check_metric_models():
    """Before any job runs: local metric model paths (e.g. the CSD checkpoint) must exist, so a
    typo fails now instead of after hours of training and sampling."""
    problems = []
    for name in sorted({encoder for domain_name in DOMAINS for encoder in domain_encoders(domain_name)}):
        block = config["metrics"][name]
        if block.get("tiny"):
            continue
        for key, value in block.items():
            looks_local = key == "checkpoint" or str(value).startswith((".", "/", "~")) or str(value).count("/") != 1
            if looks_local and not os.path.exists(os.path.expanduser(str(value))):
                problems.append(f"config key metrics.{name}.{key}: {value!r} does not exist (give the path of the downloaded file or directory)")
    if problems:
        raise ValueError("\n".join(problems))


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
    return [path for name in DOMAINS for path in domain_outputs(name)]
