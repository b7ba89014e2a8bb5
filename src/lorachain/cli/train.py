"""``lorachain train``: one task of a continual chain, or one modular concept, without Snakemake.

A thin wrapper over :func:`lorachain.train.train_task_from_file`, the function the workflow's
train_task and train_concept jobs call, with the same arguments they get: so the state directory
(state.json, the LoRA file, loss.csv) is byte-identical to the job's for the same config and seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorachain.cli.experiment import (
    CliError,
    add_config_arguments,
    add_task_arguments,
    block_at,
    first_order,
    hand_made_task,
    images_of,
    load_config,
    method_label,
    position_in,
    run_experiment,
    set_flags,
    set_model,
    task_file,
    tasks_from,
    validate,
)

TRAINING_FLAGS = {
    "steps": "steps",
    "lr": "learning_rate",
    "rank": "rank",
    "alpha": "lora_alpha",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "guidance": "guidance",
}


def _number(text: str) -> int | float:
    """An integer where the text is one (so the manifest reads 4, as the YAML's 4 gives), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _previous(args: argparse.Namespace) -> dict | None:
    """The previous task's manifest (None for task 1 or a concept)."""
    if args.previous is None:
        return None
    if args.slot is not None:
        raise CliError("--slot trains a modular concept from the base model; it takes no --previous")
    from lorachain.state import StateError, read_manifest

    if Path(args.previous).resolve() == Path(args.out).resolve():
        raise CliError(f"--out {args.out}: the same directory as --previous; give the new task its own directory")
    try:
        return read_manifest(args.previous)
    except StateError as error:
        raise CliError(f"--previous {args.previous}: {error}") from None


def _method(config: dict, args: argparse.Namespace, previous: dict | None) -> tuple[str, str]:
    """(label, config key of its block). A chain's next task continues with the previous task's
    method and parameters unless --method names another (which the trainer then refuses)."""
    if args.method is not None:
        return args.method, method_label(config, args.method, adapters=args.slot is not None)
    if previous is None:
        raise CliError("--method is missing; name a label of the config's methods (or a method: naive, ...)")
    label = previous.get("run", {}).get("method") or previous["method"]["name"]
    blocks = config.setdefault("methods", {})
    blocks.setdefault(label, {"method": previous["method"]["name"], **previous["method"]["params"]})
    return label, f"methods.{label}"


def _seed(config: dict, args: argparse.Namespace, previous: dict | None) -> int:
    """--seed; else the chain's (its run's seed), the modular block's or the config's first seed, or 0."""
    if args.seed is not None:
        return args.seed
    if previous is not None and "seed" in previous.get("run", {}):
        return int(previous["run"]["seed"])
    if args.slot is not None:
        return int((config.get("modular") or {}).get("seed", 0))
    return int((config.get("seeds") or [0])[0])


def _run_identity(args: argparse.Namespace, label: str, seed: int, previous: dict | None, config: dict) -> dict:
    """The manifest's run: the chain's; else the workflow's identity as far as it is known."""
    if previous is not None:
        return dict(previous.get("run", {}))
    identity = {"method": label, "seed": seed}
    if args.domain is not None:
        identity["domain"] = args.domain
    if args.slot is not None:
        return {**identity, "regime": "modular"}
    if args.domain is not None:
        identity["order"] = first_order(config) if args.order is None else args.order
    return identity


def _tasks(args: argparse.Namespace, config: dict, task_index: int) -> tuple[list, int]:
    """The tasks and the position (1-based) of the one trained."""
    tasks = tasks_from(args, config)
    default = task_index if args.slot is None else args.slot + 1
    if tasks is not None:
        if args.images is not None:
            raise CliError("--images makes a task by hand; with --tasks or --domain leave it out")
        position = args.task or default
        position_in(tasks, position, "--task", args.tasks or f"domain {args.domain}")
        return tasks, position
    if args.images is None or not args.prompt:
        raise CliError("no task: give --images DIR and --prompt TEXT, or --tasks FILE (or --domain NAME)")
    if len(args.prompt) > 1:
        raise CliError(f"--prompt given {len(args.prompt)} times; a task trains on one prompt")
    concept = args.concept or Path(args.images).resolve().name
    return [hand_made_task(concept, args.prompt[0], images_of(args.images))], 1


def _train(args: argparse.Namespace) -> dict:
    from lorachain import plan
    from lorachain.paths import LORA_FILE, LOSS_FILE, STATE_FILE
    from lorachain.train import train_task_from_file

    previous = _previous(args)
    config = load_config(args.config)
    set_model(config, args, default=None if previous is None else previous["base_model"])
    config.setdefault("training", {})
    set_flags(config, "training", args, TRAINING_FLAGS)
    label, key = _method(config, args, previous)
    config = validate(config, ["model", "training"])
    task_index = 1 if previous is None else previous["task_index"] + 1
    tasks, position = _tasks(args, config, task_index)
    seed = _seed(config, args, previous)
    if args.slot is not None:
        from lorachain.modular import concept_seed

        seed_of_task = concept_seed(seed, args.slot + 1)
    else:
        seed_of_task = seed
    out = Path(args.out)
    with task_file(tasks, args.tasks) as path:
        return train_task_from_file(
            tasks=path,
            position=position,
            task_index=task_index,
            previous_state=args.previous,
            slot=args.slot,
            seed=seed_of_task,
            method=block_at(config, key)["method"],
            method_params=plan.parameters_of(block_at(config, key)),
            training=plan.training_block(config),
            checkpoint_every=config["training"]["checkpoint_every"],
            model=plan.model_source(config),
            vae=config["model"].get("vae"),
            run=_run_identity(args, label, seed, previous, config),
            state=out / STATE_FILE,
            lora=out / LORA_FILE,
            loss=out / LOSS_FILE,
            class_images=args.class_images,
            tracking=config["training"].get("tracking"),
        )


def run(args: argparse.Namespace) -> int:
    return run_experiment("train", args, _train)


def register(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train one task of a continual chain, or one modular concept (a state directory)",
        description="Train one task on top of the previous task's state (--previous; task 1 without it), or "
        "one modular concept from the base model (--slot), and write the state directory a workflow job "
        "writes: state.json, the LoRA file (diffusers' layout) and loss.csv.",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="the task's state directory")
    train.add_argument(
        "--previous", metavar="TASK_DIR", help="the previous task's state (its task index + 1 is trained)"
    )
    train.add_argument(
        "--slot",
        type=int,
        metavar="S",
        help="train a modular concept in slot S (0-based, as the manifest's slot; BlockLoRA's block) from the "
        "base model; its seed is the concept's, as the train_concept job's",
    )
    train.add_argument(
        "--method", metavar="LABEL", help="a label of methods (or modular.adapters with --slot), or a method name"
    )
    train.add_argument("--seed", type=int, help="the run's seed (default: the chain's, else the config's first)")
    add_config_arguments(train)
    add_task_arguments(train, "the training prompt of the task made from --images")
    train.add_argument(
        "--task", type=int, metavar="N", help="position of the task in --tasks/--domain (default: its index)"
    )
    train.add_argument("--images", metavar="DIR", help="training images of a task made by hand (with --prompt)")
    train.add_argument("--concept", metavar="NAME", help="the hand-made task's concept (default: the folder's name)")
    train.add_argument(
        "--class-images",
        metavar="DIR",
        help="with training.prior_preservation: the domain's class images (the workflow's class_images output)",
    )
    block = train.add_argument_group("training (config block training)")
    block.add_argument("--steps", type=int, help="training.steps")
    block.add_argument("--lr", type=float, help="training.learning_rate")
    block.add_argument("--rank", type=int, help="training.rank")
    block.add_argument("--alpha", type=_number, help="training.lora_alpha")
    block.add_argument("--resolution", type=int, help="training.resolution")
    block.add_argument("--batch-size", type=int, help="training.batch_size")
    block.add_argument(
        "--guidance", type=float, help="training.guidance (FLUX.1-dev: the guidance embedding's training value)"
    )
    train.set_defaults(handler=run)
