"""Checks of the workflow config, run while the Snakefile is parsed (so the dry-run makes them too).

The JSON schema (``workflow/schemas/config.schema.yaml``) checks keys, types and ranges; this module
adds what a schema cannot see: counts that must agree across blocks, labels that must exist, whether
the models a config names by local path exist (so a missing CSD checkpoint fails before hours of
training, not in the first scoring job), and why a number was refused when YAML read it as text.
Every message names the config key and the fix. Torch-free.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import yaml

from lorachain import plan
from lorachain.composition import CompositionError, check_positions, parse_composition
from lorachain.methods import (
    MergeError,
    MethodError,
    PluginError,
    load_plugins,
    make_merge,
    make_method,
    method_class,
    schema_defs,
)
from lorachain.metrics.catalog import MODEL_KEYS, PRIOR_METRICS
from lorachain.models.denoisers import (
    TINY_FAMILIES,
    UNET_TARGETS,
    embeddings_problem,
    family_config_problems,
    family_from_files,
    refused_export_formats,
    sampling_precision_problem,
)
from lorachain.models.widths import (
    narrowest_targeted_width,
    transformer_config,
    transformer_targeted_width,
    unet_config,
)
from lorachain.training.config import TrainingConfig, TrainingError
from lorachain.training.tracking import tracker_problem
from lorachain.world.spec import check_world_block

# What PyYAML (YAML 1.1) reads as text although it looks like a number: an exponent without a
# decimal point (1e-4) or without a sign (1.0e4), or digits with underscores in odd places.
_NUMBER_LIKE = re.compile(r"^[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def is_hub_id(text: str) -> bool:
    """owner/name, as the hub spells it (a path that exists locally is never taken for one)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).expanduser().exists()


def directory_or_hub_problem(value, key: str) -> str | None:
    """Why `value` is neither an existing directory (save_pretrained) nor a hub id, or None."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir() or is_hub_id(text):
        return None
    if path.exists():
        return (
            f"config key {key}: {text!r} is a file; "
            "give the directory written by save_pretrained (or a hub id owner/name)"
        )
    return (
        f"config key {key}: {text!r} does not exist and is not a hub id (owner/name); give the path of the "
        f"downloaded directory (relative paths are read from {Path.cwd()})"
    )


def file_problem(value, key: str) -> str | None:
    text = str(value)
    path = Path(text).expanduser()
    if path.is_file():
        return None
    what = "is a directory, not a file" if path.exists() else "does not exist"
    return (
        f"config key {key}: {text!r} {what}; give the path of the downloaded file "
        f"(relative paths are read from {Path.cwd()})"
    )


def model_source_problems(config: dict, encoders: list[str]) -> list[str]:
    """Local model paths of the base model and of the metric encoders in use that do not exist.
    Hub ids cannot be checked without the network and are left to the jobs."""
    problems = []
    model = config["model"]
    if "pretrained" in model and not plan.built_by_rule(config, model["pretrained"]):
        problems.append(directory_or_hub_problem(model["pretrained"], "model.pretrained"))
    if model.get("vae"):
        problems.append(directory_or_hub_problem(model["vae"], "model.vae"))
    for name in sorted(encoders):
        block = config.get("metrics", {}).get(name) or {}
        if block.get("tiny"):
            continue
        key = MODEL_KEYS[name]
        if key not in block:
            problems.append(
                f"config key metrics.{name}.{key} is not set; name the model (or set metrics.{name}.tiny: true)"
            )
        elif plan.built_by_rule(config, block[key]):
            continue  # the world's rules build it
        elif name == "csd":
            problems.append(file_problem(block[key], f"metrics.{name}.{key}"))
        else:
            problems.append(directory_or_hub_problem(block[key], f"metrics.{name}.{key}"))
    return [problem for problem in problems if problem]


def check_model_sources(config: dict, encoders: list[str]) -> None:
    if problems := model_source_problems(config, encoders):
        raise ConfigError("\n".join(problems))


def number_like_strings(value, path: str = "") -> list[tuple[str, str]]:
    """(config key, text) of every string in the config that reads as a number."""
    if isinstance(value, dict):
        return [
            found
            for key, item in value.items()
            for found in number_like_strings(item, f"{path}.{key}" if path else str(key))
        ]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in number_like_strings(item, f"{path}[{index}]")]
    if isinstance(value, str) and _NUMBER_LIKE.match(value.strip()) and not value.strip().isdigit():
        return [(path, value)]
    return []


def number_string_hints(config: dict) -> list[str]:
    return [
        f"config key {key}: {text!r} was read as text, not a number (YAML reads exponent notation as a number only "
        f"with a decimal point and a signed exponent); write {_yaml_number(text)}"
        for key, text in number_like_strings(config)
    ]


def _yaml_number(text: str) -> str:
    """The same value in the notation YAML 1.1 reads as a float (1e-4 -> 1.0e-4)."""
    value = float(text.replace("_", ""))
    if "e" not in text.lower():
        return repr(value)
    mantissa, exponent = f"{value:e}".split("e")
    return f"{float(mantissa)!r}e{int(exponent):+d}"


def full_schema(schema: str | os.PathLike[str]) -> dict:
    """The YAML schema with the registries' ``$defs`` (method, merge and weights blocks) inserted."""
    document = yaml.safe_load(Path(schema).read_text())
    document["$defs"] = {**document.get("$defs", {}), **schema_defs()}
    return document


def _load_config_plugins(config: dict) -> None:
    """Import the config's ``plugins`` (before the schema is built: their methods join the enums)."""
    plugins = config.get("plugins") if isinstance(config, dict) else None
    if isinstance(plugins, list) and all(isinstance(name, str) for name in plugins):
        try:
            load_plugins(plugins)
        except PluginError as error:
            raise ConfigError(str(error)) from None


def validate_config(config: dict, schema: str | os.PathLike[str]) -> None:
    """Snakemake's schema validation (it fills in the defaults) against the YAML schema completed by
    the registries (:func:`full_schema`; the config's plugins are loaded first), with a hint added
    when a number was refused because YAML read it as text."""
    from snakemake.utils import validate

    _load_config_plugins(config)
    with tempfile.TemporaryDirectory(prefix="lorachain-schema-") as directory:
        path = Path(directory) / "config.schema.json"  # snakemake.utils.validate reads a file
        path.write_text(json.dumps(full_schema(schema)))
        try:
            validate(config, str(path))
        except Exception as error:
            hints = number_string_hints(config)
            if not hints:
                raise
            raise ConfigError(f"{error}\n" + "\n".join(hints)) from None


def _slot_problem(method, slots: int, key: str) -> str | None:
    try:
        method.check_slots(slots, f"{key}.num_blocks")
    except MethodError as error:
        return f"config key {key}: {error}"
    return None


def _narrowest_targeted_width(config: dict) -> int | None:
    """The narrowest targeted input width of the configured model, where its U-Net config can be
    read without loading anything (a local directory or the hub cache); None otherwise (the
    training job then names the layer that does not fit)."""
    model = config.get("model", {})
    source = model.get("pretrained")
    if not source or "training" not in config:
        return None
    targets = config["training"].get("target_modules") or UNET_TARGETS  # a U-Net's own default (read below)
    if isinstance(targets, str):  # a regex: the training job names a layer that does not fit
        return None
    unet = unet_config(str(source))
    if unet is None:  # an SD3 / FLUX transformer: all its attention projections work at one width
        transformer = transformer_config(str(source))
        return None if transformer is None else transformer_targeted_width(transformer)
    return narrowest_targeted_width(unet, list(targets))


def registered_block_problems(config: dict) -> list[str]:
    """Build every ``methods.<label>``, ``modular.adapters.<label>`` and ``modular.merges.<label>``
    block through the registries (parameter checks and cross checks of the classes themselves),
    and let each method check its slots: a chain's task t uses slot t - 1, so the longest chain
    (``max(domains.*.num_tasks)``) needs that many; a modular adapter needs ``modular.concepts``, or
    the size of the largest mixed set (``modular.mixes``)."""
    problems = []
    longest = max((block["num_tasks"] for block in config.get("domains", {}).values()), default=0)
    modular = plan.modular(config)
    mixes = plan.modular_mixes(config).values()

    def len_of_mix(counts: dict) -> int:
        return sum(counts.values())

    blocks = [(f"methods.{label}", block, longest) for label, block in config.get("methods", {}).items()]
    blocks += [
        (f"modular.adapters.{label}", block, max([modular.get("concepts", 0), *map(len_of_mix, mixes)]))
        for label, block in modular.get("adapters", {}).items()
    ]
    narrowest, rank = _narrowest_targeted_width(config), config.get("training", {}).get("rank")
    for key, block, slots in blocks:
        try:
            method = make_method(block["method"], plan.parameters_of(block), key=key)
        except MethodError as error:
            problems.append(str(error))
            continue
        problems.append(_slot_problem(method, slots, key))
        if narrowest is not None and rank:  # the schema fills in a rank; a raw config may lack one
            try:
                method.check_widths(slots, int(rank), narrowest, key)
            except MethodError as error:
                problems.append(f"config key {key}: {error}")
    for label, block in modular.get("merges", {}).items():
        try:
            make_merge(
                block["method"], plan.parameters_of(block, ("method", "adapters")), key=f"modular.merges.{label}"
            )
        except MergeError as error:
            problems.append(str(error))
    return [problem for problem in problems if problem]


def check_registered_blocks(config: dict) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`registered_block_problems`."""
    if problems := registered_block_problems(config):
        raise ConfigError("\n".join(problems))


# ------------------------------------------------------------------------------ across blocks


def domain_problems(config: dict) -> list[str]:
    """A task pool smaller than the tasks drawn from it; an evaluation prompt without its concept."""
    problems = [
        f"config key domains.{name}.task_pool: {block['task_pool']} is smaller than num_tasks {block['num_tasks']}; "
        "the pool is what every order is drawn from (raise task_pool or remove it)"
        for name, block in config["domains"].items()
        if block.get("task_pool") is not None and block["task_pool"] < block["num_tasks"]
    ]
    problems += [
        f"config key domains.{name}.eval_prompts: {template!r} must hold the concept placeholder {{}} exactly once"
        for name, block in config["domains"].items()
        for template in block.get("eval_prompts") or []
        if template.count("{}") != 1
    ]
    if not config.get("sampling", {}).get("prior_samples", True):
        problems += [
            f"config key domains.{name}.metrics: {metric} compares class-prompt images with the base model's, "
            "but sampling.prior_samples is false; set it to true or drop the metric"
            for name in config["domains"]
            for metric in plan.domain_metrics(config, name)
            if metric in PRIOR_METRICS
        ]
    return problems


def modular_problems(config: dict) -> list[str]:
    """Labels that exist, concept counts within every domain's pool, merge sizes within the concepts."""
    block, where, domains = plan.modular(config), "config key modular", list(config["domains"])
    if not block:
        return []
    problems = [
        f"{where}.domains: {name!r} is not a domain (domains: {', '.join(domains)})"
        for name in block.get("domains") or []
        if name not in domains
    ]
    concepts = block["concepts"]
    for name in plan.modular_domains(config):
        pool = plan.task_pool(config["domains"][name])
        if concepts > pool:
            problems.append(
                f"{where}.concepts: {concepts} concepts but domain {name!r} selects {pool} "
                f"(raise domains.{name}.task_pool or lower modular.concepts)"
            )
    for mix, counts in plan.modular_mixes(config).items():
        if mix in domains:
            problems.append(f"{where}.mixes.{mix}: the name of a domain; give the mixed set another name")
        for name, count in counts.items():
            if name not in domains:
                problems.append(f"{where}.mixes.{mix}.{name}: {name!r} is not a domain (domains: {', '.join(domains)})")
            elif count > plan.task_pool(config["domains"][name]):
                problems.append(
                    f"{where}.mixes.{mix}.{name}: {count} concepts but domain {name!r} selects "
                    f"{plan.task_pool(config['domains'][name])} (raise domains.{name}.task_pool or lower the count)"
                )
    problems += [
        f"{where}.merge_sizes: k = {k} exceeds modular.concepts = {concepts}"
        for k in block.get("merge_sizes") or []
        if k > concepts
    ]
    adapters = list(block["adapters"])
    problems += [
        f"{where}.merges.{label}.adapters: {merge['adapters']!r} is not a label under modular.adapters "
        f"({', '.join(adapters)})"
        for label, merge in block["merges"].items()
        if merge["adapters"] not in adapters
    ]
    problems += [
        f"{where}.eval_prompts.{kind}: {template!r} must hold the concept placeholder {{}} exactly once"
        for kind, templates in (block.get("eval_prompts") or {}).items()
        for template in templates
        if template.count("{}") != 1
    ]
    problems += [
        f"{where}.ablation: {label!r} is not a label under modular.merges ({', '.join(block['merges'])})"
        for label in block.get("ablation") or []
        if label not in block["merges"]
    ]
    return problems


def composition_problems(config: dict) -> list[str]:
    """Each composition names a set that a regime trains, prompts naming the same placeholders,
    and groups of concepts that regime trains on that set."""
    problems = []
    modular_sets, domains = plan.modular_sets(config), list(config["domains"])
    for name, block in (config.get("compositions") or {}).items():
        try:
            composition = parse_composition(name, block)
            if composition.set not in domains + modular_sets:
                raise CompositionError(
                    f"config key compositions.{name}.set: {composition.set!r} is neither a domain nor a modular set "
                    f"({', '.join(dict.fromkeys(domains + modular_sets))})"
                )
            if composition.set in domains:
                check_positions(composition, config["domains"][composition.set]["num_tasks"], "the continual regime")
            if composition.set in modular_sets:
                check_positions(composition, plan.set_size(config, composition.set), "the modular regime")
        except CompositionError as error:
            problems.append(str(error))
    return problems


def training_option_problems(config: dict) -> list[str]:
    """The training block's DreamBooth-script options against what each method declares it
    supports (``ContinualMethod.training_options``), a regex target_modules that does not compile,
    and prior preservation on a domain whose concepts have no class word (styles)."""
    block = config.get("training", {})
    trainer_keys = {*TrainingConfig.__dataclass_fields__, "optimizer"}  # not the tracking block
    try:
        training = TrainingConfig.from_dict({key: value for key, value in block.items() if key in trainer_keys})
    except TrainingError as error:
        return [str(error)]
    problems = []
    if isinstance(training.target_modules, str):
        try:
            re.compile(training.target_modules)
        except re.error as error:
            problems.append(f"config key training.target_modules: {training.target_modules!r} is not a regex ({error})")
    blocks = [(f"methods.{label}", block) for label, block in config.get("methods", {}).items()]
    adapters = plan.modular(config).get("adapters", {})
    blocks += [(f"modular.adapters.{label}", block) for label, block in adapters.items()]
    for key, block in blocks:
        try:
            method_class(block["method"], key=key).check_training_options(training.used_options(), key)
        except MethodError as error:
            problems.append(str(error))
    if training.prior_preservation:
        problems += [
            f"config key training.prior_preservation: domain {name!r} holds styles (layout unlearncanvas), "
            "which have no class word to generate class images of; turn training.prior_preservation off "
            "or train only object (dreambooth) domains"
            for name, block in config.get("domains", {}).items()
            if block["dataset"]["layout"] != "dreambooth"
        ]
    return problems


def denoiser_problems(config: dict) -> list[str]:
    """The training and sampling blocks against the model's denoiser, read from its config files
    (a local directory, the hub cache, or the tiny architecture's name): FLUX refuses fp16, a
    guidance-distilled FLUX needs training.guidance and any other model refuses it, and embedding
    tuning and gradient fusion's concept rows (cross_attention_rows: concept) need a U-Net
    pipeline. Nothing is checked when the files cannot be read offline (the training job then
    checks the same on the loaded model)."""
    model = config.get("model", {})
    if model.get("tiny"):
        family = TINY_FAMILIES.get(model["tiny"])
        found = None if family is None else (family, model["tiny"] == "flux")
    else:
        found = family_from_files(str(model.get("pretrained", "")))
    if found is None:
        return []
    family, guidance_embedding = found
    training, sampling = config.get("training"), config.get("sampling", {})
    problems = []
    if training is not None:  # a partial config (lorachain sample, merge) has no training block to check
        problems += family_config_problems(
            family, guidance_embedding, training.get("mixed_precision", "no"), training.get("guidance")
        )
    formats = (config.get("export") or {}).get("formats") or []
    wrong = refused_export_formats(formats, "unet" if family == "unet" else "transformer")
    if wrong:
        fix = "diffusers (and transformer)" if family != "unet" else "diffusers, kohya (and unet)"
        problems.append(f"config key export.formats: {wrong} cannot be written for a {family} model; use {fix}")
    if precision := sampling_precision_problem(family, sampling.get("precision", "no")):
        problems.append(precision)
    if family != "unet":
        modular = plan.modular(config)
        adapters = modular.get("adapters", {})
        # embeddings: null is embedding tuning off (make_method's reading), which a transformer takes
        tuned = {f"methods.{label}": block for label, block in config.get("methods", {}).items()}
        tuned |= {f"modular.adapters.{label}": block for label, block in adapters.items()}
        blocks = [key for key, block in tuned.items() if (block or {}).get("embeddings") is not None]
        problems += [embeddings_problem(key, family) for key in blocks]
        merges = modular.get("merges", {})
        problems += [
            f"config key modular.merges.{label}.cross_attention_rows: concept rows are a U-Net's cross-attention "
            f"keys and values at the concept's tokens; a {family.upper()} transformer has joint attention instead: "
            "use cross_attention_rows: all"
            for label, block in merges.items()
            if (block or {}).get("cross_attention_rows") == "concept"
        ]
    return problems


def tracking_problems(config: dict) -> list[str]:
    """A training tracker that is not installed (training.tracking.log_with), before any job runs."""
    log_with = ((config.get("training") or {}).get("tracking") or {}).get("log_with", "tensorboard")
    problem = tracker_problem(log_with)
    return [problem] if problem else []


def check_config(config: dict) -> None:
    """Everything the schema cannot check, all problems at once; run while the Snakefile parses."""
    problems = domain_problems(config) + modular_problems(config) + registered_block_problems(config)
    problems += training_option_problems(config)
    problems += denoiser_problems(config)
    problems += composition_problems(config)
    problems += model_source_problems(config, plan.encoders_in_use(config))
    problems += tracking_problems(config)
    if "world" in config:
        problems += check_world_block(config["world"])
    if problems:
        raise ConfigError("\n".join(problems))
