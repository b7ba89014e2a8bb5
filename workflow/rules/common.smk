# Config lookups, input functions and wildcard constraints. Rules stay declarative.
import os

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
    return {key: block[key] for key in keys if key in block}


# ------------------------------------------------------------------------------ train


def method_block(wildcards):
    """The method's own parameters, without the `method` key."""
    block = config["methods"][wildcards.method]
    return {key: value for key, value in block.items() if key != "method"}


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
