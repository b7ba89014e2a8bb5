"""What the workflow runs for a config: the params each job gets and the files each target needs.

Pure functions of the (validated, defaults-filled) config dict, so they are unit-tested without
Snakemake; ``workflow/rules/common.smk`` wraps them as input functions of wildcards.

Snakemake records a rule's params by ``repr()`` and reruns a job when they differ. Every dict
passed as a param goes through :func:`canonical`, so reordering or reformatting the YAML changes
nothing, and a rule gets only its own block, so a change reruns only what it affects.
Import-light (no torch): the Snakefile imports it while it parses.
"""

from __future__ import annotations

import dataclasses
import os

from lorachain import paths
from lorachain.metrics.catalog import DEFAULT_METRICS, MODEL_KEYS, PRIOR_METRICS, TINY_ENCODER_ENTRY, encoders_for
from lorachain.paths import task_label
from lorachain.provenance import pin_revision
from lorachain.training.config import FlowMatchingConfig, TrainingConfig, unset_options
from lorachain.world.ids import CONTENTS_VERSION, SPEC_KEYS, world_id
from lorachain.world.spec import world_block as with_world_defaults

# Keys of a domain block that the task selection reads; other changes do not re-select.
SELECTION_KEYS = ("selection_seed", "concepts", "tokens", "train_images_per_style", "eval_prompts")


def canonical(value):
    """`value` with every dict's keys sorted (recursively): what a param's repr depends on."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    return value


def stage_block(config: dict, name: str, leave_out=()) -> dict:
    return canonical({key: value for key, value in config[name].items() if key not in leave_out})


def training_block(config: dict) -> dict:
    """What a task's result depends on: everything in `training` but how often it checkpoints, how
    it is tracked (training.tracking: the rules pass both as unrecorded params) and
    the DreamBooth-script options left at their defaults (off: a config that does not set them
    gives the params it gave before they existed)."""
    unset = unset_options(config["training"])
    if _is_default_flow_matching(config["training"].get("flow_matching")):  # U-Nets: as before it existed
        unset.append("flow_matching")
    return stage_block(config, "training", leave_out=("checkpoint_every", "tracking", *unset))


def _is_default_flow_matching(block: dict | None) -> bool:
    return block is None or dict(block) in ({}, dataclasses.asdict(FlowMatchingConfig()))


def class_images_input(config: dict, domain: str) -> list[str]:
    """A training job's class-image directory: the domain's, with training.prior_preservation."""
    if not config["training"].get("prior_preservation"):
        return []
    return [paths.CLASS_IMAGES_DIR.format(domain=domain)]


def class_images_params(config: dict) -> dict:
    """What the class images depend on: the sampling settings that shape an image (not how many
    evaluation samples are drawn or in what batches) and training.num_class_images."""
    shaping = ("noise_seed", "steps", "guidance_scale", "resolution", "scheduler", "precision")
    sampling = {key: value for key, value in config["sampling"].items() if key in shaping}
    count = config["training"].get("num_class_images", TrainingConfig.num_class_images)
    return canonical({"sampling": sampling, "num_class_images": count})


def revision(config: dict, stage: str):
    """Code-change policy: editing the library or a script does not rerun anything (profiles set
    rerun-triggers without `code`); bumping `revisions.<stage>` in the config reruns that stage
    and everything downstream of it."""
    return config["revisions"][stage]


def parameters_of(block: dict, leave_out=("method",)) -> dict:
    """A method, adapter or merge block's own parameters (without its `method` and labels)."""
    return canonical({key: value for key, value in block.items() if key not in leave_out})


# ------------------------------------------------------------------------------ model and data


def model_source(config: dict) -> str:
    """What training loads: a hub id (pinned by model.revision: owner/name@revision) / local
    directory, or the tiny pipeline the workflow builds."""
    model = config["model"]
    if "tiny" in model:
        return pin_revision(paths.TINY_MODEL.format(architecture=model["tiny"]), model.get("revision"))
    return pin_revision(model["pretrained"], model.get("revision"))  # owner/name@revision, see loading


def world_outputs(config: dict) -> set[str]:
    """The paths the world's rules write, when the config has a `world` block."""
    if "world" not in config:
        return set()
    encoders = {paths.WORLD_ENCODER.format(encoder=name) for name in ("dino", "clip")}
    return {paths.WORLD_PIPELINE, paths.WORLD_CSD, paths.WORLD_OBJECTS, paths.WORLD_STYLES, *encoders}


def built_by_rule(config: dict, path: str) -> list[str]:
    """[path] when a rule of this workflow writes it (a world model or dataset), else []: a real
    model or dataset is read by the job itself, so the full grid dry-runs without it."""
    return [path] if os.path.normpath(str(path)) in world_outputs(config) else []


def model_inputs(config: dict) -> list[str]:
    """The tiny and world models are built by rules; a real model is read from its hub id or path by the job."""
    if "tiny" in config["model"]:
        return [model_source(config)]
    return built_by_rule(config, model_source(config))


def dataset_root(config: dict, domain: str) -> str:
    dataset = config["domains"][domain]["dataset"]
    if "synthetic" in dataset:
        return paths.SYNTHETIC_DATA.format(domain=domain)
    return dataset["root"]


def dataset_inputs(config: dict, domain: str) -> list[str]:
    """A generated dataset is a rule's output; a local copy is validated by prepare_tasks itself, so
    that the full grid can be dry-run on a machine without the data."""
    if "synthetic" in config["domains"][domain]["dataset"]:
        return [dataset_root(config, domain)]
    return built_by_rule(config, dataset_root(config, domain))


def task_pool(block: dict) -> int:
    """How many concepts are selected and ordered; runs train the first num_tasks of them."""
    return block.get("task_pool") or block["num_tasks"]


def selection_block(config: dict, domain: str) -> dict:
    """Only what the task selection reads. The selection is made for the pool (under the key
    `num_tasks` that the selection functions take), so raising num_tasks within the pool keeps
    every task file, and so every existing job, as it is."""
    block = config["domains"][domain]
    return canonical({"num_tasks": task_pool(block), **{key: block[key] for key in SELECTION_KEYS if key in block}})


def reference_order(config: dict):
    """Base samples, reference embeddings and modular concepts belong to concepts, not to an
    order: they use the first order's task list (every order holds the same concepts)."""
    return config["orders"][0]


# ------------------------------------------------------------------------------ metrics


def domain_metrics(config: dict, domain: str) -> list[str]:
    block = config["domains"][domain]
    return list(block.get("metrics") or DEFAULT_METRICS[block["dataset"]["layout"]])


def set_metrics(config: dict, name: str) -> list[str] | dict[str, list[str]]:
    """The metrics of a domain (one list); of a mixed set, each concept's own domain's metrics
    (position "1".."N" -> list), so each concept is scored by its own kind's metrics."""
    if name not in modular_mixes(config):
        return domain_metrics(config, name)
    return {
        str(position): domain_metrics(config, domain) for position, domain in enumerate(set_members(config, name), 1)
    }


def _member_domains(config: dict, name: str) -> list[str]:
    return list(modular_mixes(config)[name]) if name in modular_mixes(config) else [name]


def domain_encoders(config: dict, domain: str) -> list[str]:
    return encoders_for(
        [metric for member in _member_domains(config, domain) for metric in domain_metrics(config, member)]
    )


def encoders_in_use(config: dict) -> list[str]:
    return sorted({encoder for domain in config["domains"] for encoder in domain_encoders(config, domain)})


def encoder_blocks(config: dict, domain: str) -> dict:
    """Loader blocks of the encoders a domain's metrics need; tiny ones point into resources/."""
    blocks = {}
    for name in domain_encoders(config, domain):
        block = config["metrics"][name]
        if block.get("tiny"):
            key, entry = TINY_ENCODER_ENTRY[name]
            blocks[name] = {key: os.path.join(paths.TINY_ENCODER.format(encoder=name), entry)}
        else:
            blocks[name] = {MODEL_KEYS[name]: block[MODEL_KEYS[name]]}
            if built_by_rule(config, block[MODEL_KEYS[name]]):  # the loader checks it is this world's
                blocks[name]["world"] = world_id(config["world"])
    return canonical(blocks)


def encoder_inputs(config: dict, domain: str) -> list[str]:
    inputs = []
    for name in domain_encoders(config, domain):
        block = config["metrics"][name]
        if block.get("tiny"):
            inputs.append(paths.TINY_ENCODER.format(encoder=name))
        else:
            inputs += built_by_rule(config, block[MODEL_KEYS[name]])
    return inputs


# ------------------------------------------------------------------------------ continual runs


def runs(config: dict) -> list[tuple]:
    """(method, order, seed) of every run of a domain, in config order."""
    return [
        (method, order, seed) for method in config["methods"] for order in config["orders"] for seed in config["seeds"]
    ]


def chain_files(run: dict, through: int) -> list[str]:
    """State and LoRA files of tasks 1..`through` of one run (a state is folded from its chain)."""
    return [path for task in range(1, through + 1) for path in paths.state_files(paths.task_dir(**run, task=task))]


def check_task_index(config: dict, domain: str, task: str) -> int:
    index = int(task)
    num_tasks = config["domains"][domain]["num_tasks"]
    if not 1 <= index <= num_tasks:
        raise ValueError(f"task {index} requested but domains.{domain}.num_tasks is {num_tasks}")
    return index


def run_sample_dirs(config: dict, run: dict) -> list[str]:
    """Every sample set of one run: after task 1..T."""
    num_tasks = config["domains"][run["domain"]]["num_tasks"]
    return [paths.SAMPLES_DIR.format(**run, task=task_label(task)) for task in range(1, num_tasks + 1)]


def domain_run_scores(config: dict, domain: str) -> dict:
    return canonical(
        {
            f"{method}|{order}|{seed}": paths.RUN_SCORES.format(domain=domain, method=method, order=order, seed=seed)
            for method, order, seed in runs(config)
        }
    )


def domain_loss_logs(config: dict, domain: str) -> dict:
    """Every task's loss.csv of every run of a domain, "method|order|seed|task" -> path (the
    domain's loss figure)."""
    num_tasks = config["domains"][domain]["num_tasks"]
    return canonical(
        {
            f"{method}|{order}|{seed}|{task}": f"{paths.task_dir(domain, method, order, seed, task)}/{paths.LOSS_FILE}"
            for method, order, seed in runs(config)
            for task in range(1, num_tasks + 1)
        }
    )


def grid_sample_dirs(config: dict, domain: str) -> dict:
    """The image grid shows the first run (first order, first seed) of every method."""
    order, seed = config["orders"][0], config["seeds"][0]
    return canonical(
        {
            f"{method}|{task}": paths.SAMPLES_DIR.format(
                domain=domain, method=method, order=order, seed=seed, task=task_label(task)
            )
            for method in config["methods"]
            for task in range(1, config["domains"][domain]["num_tasks"] + 1)
        }
    )


# ------------------------------------------------------------------------------ compositions


def compositions_of(config: dict, name: str) -> dict:
    """The composition blocks whose set is `name` (a continual domain or a modular set), canonical:
    what a sampling job of that set gets."""
    return canonical(
        {label: block for label, block in (config.get("compositions") or {}).items() if block["set"] == name}
    )


def composition_labels(config: dict, name: str) -> list[str]:
    return list(compositions_of(config, name))


def run_composition_dirs(config: dict, run: dict) -> list[str]:
    """The composition sample sets of one run: after task 1..T (empty where no group is learned)."""
    num_tasks = config["domains"][run["domain"]]["num_tasks"]
    return [paths.COMPOSITIONS_DIR.format(**run, task=task_label(task)) for task in range(1, num_tasks + 1)]


def domain_run_composition_scores(config: dict, domain: str) -> dict:
    """Every run's composition scores of a continual domain that has compositions ({} otherwise)."""
    if not compositions_of(config, domain):
        return {}
    return canonical(
        {
            f"{method}|{order}|{seed}": paths.RUN_COMPOSITION_SCORES.format(
                domain=domain, method=method, order=order, seed=seed
            )
            for method, order, seed in runs(config)
        }
    )


def composition_outputs(config: dict, name: str) -> list[str]:
    """The modular results of each composition of set `name`: its table, its by-k points, its
    figure and its image grid."""
    figures = paths.FIGURES.format(domain=name)
    outputs = []
    for label in composition_labels(config, name):
        table = paths.COMPOSITION_TABLE.format(domain=name, composition=label)
        outputs += [f"{table}.csv", f"{table}.md", f"{table}-by-k.csv"]
        outputs += [f"{figures}/composition-{label}.{suffix}" for suffix in ("png", "pdf")]
        outputs.append(f"{figures}/composition-{label}-grid.png")
    return outputs


# ------------------------------------------------------------------------------ modular regime


def modular(config: dict) -> dict:
    return config.get("modular") or {}


def modular_domains(config: dict) -> list[str]:
    """The domains the modular regime runs on (all of them unless `modular.domains` names some)."""
    block = modular(config)
    if not block:
        return []
    return [name for name in config["domains"] if block.get("domains") is None or name in block["domains"]]


def modular_mixes(config: dict) -> dict[str, dict[str, int]]:
    """Mixed concept sets: name -> {domain: how many of its concepts}, drawn in the listed order
    (BlockLoRA's 15 concepts of several kinds)."""
    return dict(modular(config).get("mixes") or {})


def modular_sets(config: dict) -> list[str]:
    """What the modular regime runs on: its domains, then its mixed concept sets."""
    return modular_domains(config) + list(modular_mixes(config))


def set_members(config: dict, name: str) -> list[str]:
    """The domain of each concept (position 1..N) of a modular set."""
    mix = modular_mixes(config).get(name)
    if mix is None:
        return [name] * modular(config)["concepts"]
    return [domain for domain, count in mix.items() for _ in range(count)]


def set_size(config: dict, name: str | None = None) -> int:
    return modular(config)["concepts"] if name is None else len(set_members(config, name))


def merge_sizes(config: dict, name: str | None = None) -> list[int]:
    """The k merged in a modular set: ``modular.merge_sizes`` (default 1..N); a mixed set keeps the
    sizes that fit it and always merges all its concepts."""
    size, given = set_size(config, name), modular(config).get("merge_sizes")
    if not given:
        return list(range(1, size + 1))
    sizes = [k for k in given if k <= size]
    return sizes if name not in modular_mixes(config) or size in sizes else [*sizes, size]


def concept_labels(config: dict, name: str | None = None) -> list[str]:
    return [task_label(index) for index in range(1, set_size(config, name) + 1)]


def mix_task_files(config: dict, name: str) -> dict[str, str]:
    """The reference task file of each domain a mixed set draws from."""
    return {
        domain: paths.TASKS.format(domain=domain, order=reference_order(config))
        for domain in modular_mixes(config)[name]
    }


def merged_concept_dirs(config: dict, domain: str, merge: str, k: int) -> list[str]:
    adapter = modular(config)["merges"][merge]["adapters"]
    return [
        paths.CONCEPT_DIR.format(domain=domain, adapter=adapter, concept=task_label(index)) for index in range(1, k + 1)
    ]


def merge_recording(config: dict, merge: str) -> str | None:
    """How merge label `merge` needs its concepts' layer inputs recorded (the {recording} of their
    gram files), or None for a merge that needs none."""
    from lorachain.methods import merge_class

    block = modular(config)["merges"][merge]
    return merge_class(block["method"]).layer_input_recording(parameters_of(block, leave_out=("method", "adapters")))


def merged_gram_files(config: dict, domain: str, merge: str, k: int, template: str = paths.GRAMS_FILE) -> list[str]:
    """The gram files (or, with template GRAMS_RECORD_FILE, their records) of the first k concepts
    of a merge that needs recorded layer inputs; [] for one that does not."""
    recording = merge_recording(config, merge)
    if recording is None:
        return []
    name = template.format(recording=recording)
    return [f"{directory}/{name}" for directory in merged_concept_dirs(config, domain, merge, k)]


def recording_pattern() -> str:
    """The {recording} wildcard's constraint: a source, optionally with restricted cross-attention rows."""
    from lorachain.merging.fusion import CROSS_ATTENTION_ROWS, RECORDING_SOURCES

    return f"({'|'.join(RECORDING_SOURCES)})(-({'|'.join(CROSS_ATTENTION_ROWS[1:])}))?"


def modular_merges(config: dict) -> dict:
    """The table's rows: each merge label's method, the adapters it merges and their method and
    parameters (sorted by label)."""
    block = modular(config)
    adapters = block.get("adapters", {})
    return canonical(
        {
            label: {
                "method": merge["method"],
                "adapters": merge["adapters"],
                "adapter_method": adapters[merge["adapters"]]["method"],
                "adapter_params": _with_defaults(adapters[merge["adapters"]]),
                "merge_params": _with_defaults(merge, merge=True),
            }
            for label, merge in block.get("merges", {}).items()
        }
    )


def _with_defaults(block: dict, merge: bool = False) -> dict:
    """A method (or, with `merge`, a merge) block's parameters with its class's defaults filled in
    (what the tables show), or the block's own when the name is not registered (an unloaded plugin:
    the config check says so)."""
    from lorachain.methods import MergeError, MethodError, merge_class, method_class

    own = parameters_of(block, leave_out=("method", "adapters") if merge else ("method",))
    try:
        registered = (merge_class if merge else method_class)(block["method"])
    except (MethodError, MergeError):
        return own
    return canonical({**registered.parameters(), **own})


def prior_metric(config: dict, domain: str) -> str | None:
    """The prior-drift metric the modular figure of a set shows (the first one scored; a mixed set
    names its members' joined by '/'), if any."""
    found = [
        next((metric for metric in domain_metrics(config, member) if metric in PRIOR_METRICS), None)
        for member in _member_domains(config, domain)
    ]
    found = list(dict.fromkeys(metric for metric in found if metric))
    return "/".join(found) or None


# ------------------------------------------------------------------------------ targets


def domain_outputs(config: dict, domain: str) -> list[str]:
    """Tables, figures (the runs' training loss included) and the image grid of one domain (what the
    report shows)."""
    table, figures = paths.TABLE.format(domain=domain), paths.FIGURES.format(domain=domain)
    outputs = [f"{table}.csv", f"{table}.md", f"{figures}/grid.png"]
    outputs += [f"{figures}/losses.{suffix}" for suffix in ("png", "pdf")]  # the runs' training loss
    for metric in domain_metrics(config, domain):
        for kind in ("heatmap", "curve"):
            outputs += [f"{figures}/{kind}-{metric}.{suffix}" for suffix in ("png", "pdf")]
    return outputs


def modular_outputs(config: dict, domain: str) -> list[str]:
    """The modular results of one modular set (a domain or a mixed set)."""
    table, figures = paths.MODULAR_TABLE.format(domain=domain), paths.FIGURES.format(domain=domain)
    outputs = [f"{table}.{suffix}" for suffix in ("csv", "md")]
    outputs += [f"{figures}/modular-curve.{suffix}" for suffix in ("png", "pdf")]
    if prior_metric(config, domain):
        outputs += [f"{figures}/modular-prior-drift.{suffix}" for suffix in ("png", "pdf")]
    if modular(config).get("ablation"):
        outputs += [f"{paths.ABLATION_TABLE.format(domain=domain)}.{suffix}" for suffix in ("csv", "md")]
    outputs += composition_outputs(config, domain)
    if set_size(config, domain) >= 2:
        outputs += [
            f"{figures}/diagnostics-{adapter}-{kind}.png"
            for adapter in modular(config)["adapters"]
            for kind in ("cosine", "sign-conflicts")
        ]
    return outputs


def all_outputs(config: dict) -> list[str]:
    """What `rule all` asks for: every domain's results, then the modular regime's, then the
    run's provenance table."""
    world = [paths.WORLD_EVALUATION] if "world" in config else []
    continual = [path for name in config["domains"] for path in domain_outputs(config, name)]
    modular_ = [path for name in modular_sets(config) for path in modular_outputs(config, name)]
    return world + continual + modular_ + [f"{paths.PROVENANCE_TABLE}.{suffix}" for suffix in ("csv", "md")]


def final_state(config: dict, run: dict) -> str:
    """The manifest of a run's last task (what `snakemake export` exports of the run)."""
    last = config["domains"][run["domain"]]["num_tasks"]
    return f"{paths.task_dir(**run, task=last)}/{paths.STATE_FILE}"


def export_outputs(config: dict) -> list[str]:
    """What `snakemake export` asks for (not part of `rule all`): the final state of every continual
    run and every merge at its set's largest k, exported as config block `export` says."""
    exports = [
        paths.EXPORT_DIR.format(domain=domain, method=method, order=order, seed=seed)
        for domain in config["domains"]
        for method, order, seed in runs(config)
    ]
    for name in modular_sets(config):
        k = max(merge_sizes(config, name))
        merges = modular(config)["merges"]
        exports += [paths.MERGE_EXPORT_DIR.format(domain=name, merge=merge, k=k) for merge in merges]
    return exports


def world_block(config: dict) -> dict:
    """The world's contents block, canonical (its training settings are separate rule params)."""
    if "world" not in config:
        return {}
    full = with_world_defaults(config["world"])
    return canonical({key: full[key] for key in SPEC_KEYS})


def world_revision() -> int:
    """The world rules' `revision` param: the world's contents version (lorachain.world.ids), so a
    code change that alters what a world contains rebuilds a cached world and what depends on it."""
    return CONTENTS_VERSION


def world_training(config: dict, part: str, encoder: str | None = None) -> dict:
    """world.pretrain or world.encoders.<encoder>: how long a world model trains."""
    block = (config.get("world") or {}).get(part) or {}
    return canonical((block.get(encoder) or {}) if encoder else block)
