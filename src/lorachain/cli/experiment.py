"""What ``lorachain train``, ``sample`` and ``merge`` share: one experiment's config and its tasks.

The config is the workflow's: a YAML file with any of the workflow config's blocks (a whole
workflow config works too), the common settings as flags on top, validated by the workflow's own
schema and checks (:func:`lorachain.config_checks.validate_config` and the checks the dry-run
makes), so a typo or an unknown method gives the error the dry-run gives. Only the blocks a
subcommand needs are required.

The tasks are the workflow's task files (``--tasks``, written by the prepare_tasks step, or
``--domain``, the same selection made from the config's ``domains`` block), or tasks made by hand
from a folder of images and a training prompt (``--images``, ``--prompt``). A hand-made task's
concept (``--concept``, default the folder's name) is also its prompt phrase: evaluation prompt
templates' ``{}`` becomes it ("sks_dog" -> "sks dog").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
from pathlib import Path

from lorachain.cli.common import fail

SCHEMA = Path(__file__).resolve().parents[3] / "workflow" / "schemas" / "config.schema.yaml"


class CliError(ValueError):
    """Unusable command-line input; the message names the flag, file or config key and the fix."""


def user_errors() -> tuple[type[Exception], ...]:
    """The library's errors that name their file or config key: printed as they are, exit 2."""
    from lorachain.config_checks import ConfigError
    from lorachain.data import DatasetError
    from lorachain.methods import MergeError, MethodError, PluginError
    from lorachain.models.denoisers import DenoiserError
    from lorachain.modular import ModularError
    from lorachain.sample import SamplingError
    from lorachain.state import StateError
    from lorachain.training.config import TrainingError

    errors = (CliError, ConfigError, DatasetError, MergeError, MethodError, PluginError, ModularError)
    return errors + (SamplingError, StateError, TrainingError, DenoiserError)


def run_experiment(command: str, args: argparse.Namespace, body, extra_errors: tuple = ()) -> int:
    """Run `body(args)` on --threads threads and print its summary as JSON; a user error (the
    library's, naming its file or key, or one of `extra_errors`) is printed as lorachain's error
    line, exit 2."""
    try:
        use_threads(args.threads)
        summary = body(args)
    except (*user_errors(), *extra_errors) as error:
        return fail(command, str(error))
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------ the config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads of torch (default 1, as the workflow's jobs: results are byte-identical to a job's "
        "only at its thread count)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML with the workflow config's blocks (model, training, methods, modular, sampling, domains); "
        "flags override it",
    )
    parser.add_argument("--model", metavar="PATH_OR_HUB_ID", help="base pipeline (config key model.pretrained)")
    parser.add_argument("--vae", metavar="PATH_OR_HUB_ID", help="replacement VAE (config key model.vae)")


def add_task_arguments(parser: argparse.ArgumentParser, hand_made: str) -> None:
    tasks = parser.add_argument_group("tasks (a workflow task file, a config domain, or made by hand)")
    tasks.add_argument("--tasks", metavar="FILE", help="a task file of the workflow (results/<domain>/tasks/...)")
    tasks.add_argument("--domain", metavar="NAME", help="select the tasks of domains.NAME of --config, as the workflow")
    tasks.add_argument("--order", type=int, metavar="N", help="order seed of --domain (default: the config's first)")
    tasks.add_argument("--prompt", action="append", metavar="TEXT", help=hand_made)


def use_threads(threads: int) -> None:
    """Hold torch to `threads` CPU threads, as :func:`lorachain.workflow_io.run_job` holds a job to
    its rule's: a reduction split over another number of threads rounds differently."""
    import os

    if threads < 1:
        raise CliError(f"--threads {threads}: give at least 1")
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read when torch starts
        os.environ[variable] = str(threads)
    from lorachain.torch_env import torch

    torch.set_num_threads(threads)


def load_config(path: str | None) -> dict:
    """The YAML file's blocks (an empty config without a file)."""
    if path is None:
        return {}
    import yaml

    file = Path(path)
    if not file.is_file():
        raise CliError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise CliError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise CliError(f"--config {path}: a YAML mapping of config blocks expected, got {type(config).__name__}")
    return config


def set_model(config: dict, args: argparse.Namespace, default: str | None = None) -> None:
    """--model/--vae into the model block; `default` (a state's base model) where neither gives one."""
    if args.model is not None:
        config["model"] = {"pretrained": args.model, **{k: v for k, v in config.get("model", {}).items() if k == "vae"}}
    elif "model" not in config and default is not None:
        config["model"] = {"pretrained": default}
    if args.vae is not None:
        config.setdefault("model", {})["vae"] = args.vae


def set_flags(config: dict, block: str, args: argparse.Namespace, flags: dict[str, str]) -> None:
    """Flags given (argparse dest -> config key of `block`) into that block."""
    values = {key: getattr(args, dest) for dest, key in flags.items() if getattr(args, dest) is not None}
    if values:
        config[block] = {**(config.get(block) or {}), **values}


def _subset_schema(required: list[str]) -> Path:
    """The workflow's schema with only `required` blocks required, in a temporary file."""
    import yaml

    if not SCHEMA.is_file():
        raise CliError(f"{SCHEMA}: the workflow's config schema is missing; run lorachain from its source tree")
    schema = yaml.safe_load(SCHEMA.read_text())
    schema["required"] = list(required)
    path = Path(tempfile.mkdtemp(prefix="lorachain-cli-")) / "config.schema.yaml"
    path.write_text(yaml.safe_dump(schema))  # YAML: validate_config reads it as YAML (JSON's 1e-08 is text there)
    return path


def validate(config: dict, required: list[str]) -> dict:
    """The config validated (defaults filled in) by the workflow's schema and checks. A whole
    workflow config (one with ``domains``) gets every check of the dry-run; a partial one the
    checks of the blocks it has: the method, adapter and merge blocks through their registries,
    and the models it names by path."""
    import shutil

    from lorachain import config_checks

    config = copy.deepcopy(config)
    if "tiny" in config.get("model", {}):
        raise CliError("config key model.tiny: the workflow builds tiny models; give --model PATH (a saved pipeline)")
    schema = _subset_schema(required)
    try:
        config_checks.validate_config(config, schema)
    except config_checks.ConfigError:
        raise
    except Exception as error:  # snakemake's WorkflowError: the schema's message, with the key
        raise CliError(f"config: {error}") from None
    finally:
        shutil.rmtree(schema.parent, ignore_errors=True)
    if "domains" in config:
        config_checks.check_config(config)
    else:
        problems = config_checks.registered_block_problems(config)
        problems += config_checks.model_source_problems(config, []) if "model" in config else []
        problems += config_checks.denoiser_problems(config) if "model" in config else []
        if problems:
            raise config_checks.ConfigError("\n".join(problems))
    return config


def method_label(config: dict, label: str, adapters: bool = False) -> str:
    """Where `label`'s block lives: ``modular.adapters`` (a concept, when it is there) or
    ``methods``. A label in neither is taken for a registered method's name: ``methods.<label>``
    becomes ``{method: <label>}`` (its defaults), checked by the schema like any other."""
    if adapters and label in (config.get("modular") or {}).get("adapters", {}):
        return f"modular.adapters.{label}"
    config.setdefault("methods", {}).setdefault(label, {"method": label})
    return f"methods.{label}"


def block_at(config: dict, key: str) -> dict:
    block = config
    for part in key.split("."):
        block = block[part]
    return block


# ------------------------------------------------------------------------------ tasks


def hand_made_task(concept: str, train_prompt: str, images: list[str] = (), prompts: list[str] | None = None):
    """A task made by hand: the concept is also its prompt phrase (its name with _ as spaces)."""
    from lorachain.data.selection import Task, concept_phrase

    task = Task(
        concept=concept,
        kind="object",
        token=None,
        class_name=concept_phrase(concept),
        train_images=tuple(images),
        train_prompt=train_prompt,
        eval_prompts=(train_prompt,),
        reference_images=tuple(images),
    )
    return task if not prompts else with_prompts(task, prompts)


def with_prompts(task, prompts: list[str]):
    """`task` sampled on `prompts`: a prompt holding {} gets the task's phrase, others stay as given."""
    from dataclasses import replace

    bad = [prompt for prompt in prompts if prompt.count("{}") > 1]
    if bad:
        raise CliError(f"--prompt {bad[0]!r}: holds the concept placeholder {{}} more than once")
    return replace(task, eval_prompts=tuple(p.format(task.identifier) if "{}" in p else p for p in prompts))


def images_of(directory: str) -> list[str]:
    from lorachain.data.datasets import list_images

    path = Path(directory).resolve()
    if not path.is_dir():
        raise CliError(f"--images {directory}: no such directory")
    images = list_images(path)
    if not images:
        raise CliError(f"--images {directory}: no image files (.jpg, .jpeg, .png, .webp, .bmp) in it")
    return images


def first_order(config: dict) -> int:
    """The workflow's reference order: the config's first order seed (0 without one)."""
    return (config.get("orders") or [0])[0]


def domain_tasks(config: dict, domain: str, order: int | None) -> list:
    """The workflow's prepare_tasks selection of ``domains.<domain>`` in order `order`."""
    from lorachain import plan
    from lorachain.data.domains import select_domain_tasks
    from lorachain.data.selection import order_tasks

    domains = config.get("domains") or {}
    if domain not in domains:
        known = ", ".join(domains) or "none: give --config with a domains block"
        raise CliError(f"--domain {domain}: not a domain of the config (domains: {known})")
    if "synthetic" in domains[domain]["dataset"]:
        raise CliError(f"config key domains.{domain}.dataset.synthetic: the workflow generates it; give --tasks")
    order = first_order(config) if order is None else order
    layout = domains[domain]["dataset"]["layout"]
    selected = select_domain_tasks(
        layout, plan.dataset_root(config, domain), plan.selection_block(config, domain), domain
    )
    return order_tasks(selected, order)


def tasks_from(args: argparse.Namespace, config: dict) -> list | None:
    """The tasks of --tasks or --domain (None when neither is given)."""
    from lorachain.data import read_tasks

    if args.tasks is not None and args.domain is not None:
        raise CliError("--tasks and --domain both give the tasks; give one")
    if args.tasks is not None:
        return read_tasks(args.tasks)
    if args.domain is not None:
        return domain_tasks(config, args.domain, args.order)
    return None


@contextlib.contextmanager
def task_file(tasks: list, given: str | None = None):
    """A task file holding `tasks`: the given file itself, or a temporary one (the library's jobs
    read their tasks from a file)."""
    if given is not None:
        yield given
        return
    from lorachain.data.selection import write_tasks

    with tempfile.TemporaryDirectory(prefix="lorachain-tasks-") as directory:
        path = Path(directory) / "tasks.json"
        write_tasks(path, tasks)
        yield str(path)


def position_in(tasks: list, position: int, flag: str, source: str) -> None:
    if not 1 <= position <= len(tasks):
        raise CliError(f"{flag} {position}: {source} holds {len(tasks)} tasks (1..{len(tasks)})")
