"""``lorachain sample``: sample a state (or the base model) without Snakemake.

A thin wrapper over :func:`lorachain.sample.sample_after_task`, the function the workflow's
sample_state and sample_base jobs call: the paired seeded noises, the same sample set layout
(``task<NN>/p<i>-n<j>.png`` and ``index.csv``) and the same index columns. A state is sampled on
its tasks 1..i, the base model on every task given. The method and its parameters come from the
state's manifest, the base model from it too unless --model names one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorachain.cli.experiment import (
    CliError,
    add_config_arguments,
    add_task_arguments,
    hand_made_task,
    load_config,
    run_experiment,
    set_flags,
    set_model,
    task_file,
    tasks_from,
    validate,
    with_prompts,
)

SAMPLING_FLAGS = {
    "num_samples": "num_samples",
    "steps": "steps",
    "guidance": "guidance_scale",
    "resolution": "resolution",
    "batch_size": "batch_size",
    "noise_seed": "noise_seed",
}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling block's common keys as flags (:data:`SAMPLING_FLAGS`)."""
    block = parser.add_argument_group("sampling (config block sampling)")
    block.add_argument("--num-samples", type=int, help="sampling.num_samples (noises per prompt)")
    block.add_argument("--steps", type=int, help="sampling.steps")
    block.add_argument("--guidance", type=float, help="sampling.guidance_scale")
    block.add_argument("--resolution", type=int, help="sampling.resolution")
    block.add_argument("--batch-size", type=int, help="sampling.batch_size")
    block.add_argument("--noise-seed", type=int, help="sampling.noise_seed")


def chain_of(state_dir: str | None) -> list[dict]:
    """The manifests of the chain ending at `state_dir` (empty for the base model)."""
    if state_dir is None:
        return []
    from lorachain.state import read_chain

    if not Path(state_dir).is_dir():
        raise CliError(f"{state_dir}: no such state directory (give a task's directory, holding state.json)")
    return [manifest for _, manifest in read_chain(state_dir)]


def _tasks(args: argparse.Namespace, config: dict, chain: list[dict]) -> tuple[list, bool]:
    """The tasks sampled and whether they were made by hand (then without prior samples: a
    hand-made task has no class word)."""
    given = tasks_from(args, config)
    if given is not None:
        source = args.tasks or f"domain {args.domain}"
        if len(given) < len(chain):
            raise CliError(f"{source}: holds {len(given)} tasks, the state is after task {len(chain)}")
        for index, (task, manifest) in enumerate(zip(given, chain), start=1):
            if task.concept != manifest["concept"]:
                raise CliError(
                    f"{source}: task {index} is {task.concept!r}, but the state's task {index} learned "
                    f"{manifest['concept']!r}; give the task file its chain was trained on"
                )
        return [with_prompts(task, args.prompt) if args.prompt else task for task in given], False
    if not chain:
        if not args.prompt:
            raise CliError("the base model needs prompts: give --prompt TEXT (repeatable), --tasks FILE or --domain")
        return [hand_made_task("base", args.prompt[0], prompts=args.prompt)], True
    return [hand_made_task(m["concept"], m["train_prompt"], prompts=args.prompt) for m in chain], True


def _identity(chain: list[dict]) -> dict:
    """The index's model columns: the workflow's for a state (its run) and for the base model."""
    if not chain:
        return {"model": "base", "method": "base", "domain": "", "order": "", "seed": "", "after_task": 0}
    last = chain[-1]
    run = last.get("run", {})
    columns = {key: run.get(key, "") for key in ("domain", "order", "seed")}
    model = run.get("method", last["method"]["name"])
    return {**columns, "model": model, "method": last["method"]["name"], "after_task": last["task_index"]}


def _sample(args: argparse.Namespace) -> dict:
    from lorachain import plan
    from lorachain.sample import sample_after_task

    chain = chain_of(args.state)
    config = load_config(args.config)
    set_model(config, args, default=chain[-1]["base_model"] if chain else None)
    if "model" not in config:
        raise CliError("the base model is not named: give --model PATH_OR_HUB_ID (or a state to sample)")
    set_flags(config, "sampling", args, SAMPLING_FLAGS)
    config = validate(config, ["model"])
    tasks, by_hand = _tasks(args, config, chain)
    sampling = plan.stage_block(config, "sampling")
    if by_hand:
        sampling["prior_samples"] = False
    method = chain[-1]["method"] if chain else {"name": None, "params": None}
    identity = _identity(chain)
    if not chain and args.domain is not None:
        identity["domain"] = args.domain
    with task_file(tasks, None if args.prompt else args.tasks) as path:
        return sample_after_task(
            tasks_file=path,
            task_index=len(chain) or None,
            state_dir=args.state,
            method_name=method["name"],
            method_params=method["params"],
            sampling=sampling,
            model_source=plan.model_source(config),
            vae=config["model"].get("vae"),
            output_dir=args.out,
            identity=identity,
        )


def run(args: argparse.Namespace) -> int:
    return run_experiment("sample", args, _sample)


def register(commands) -> None:
    sample = commands.add_parser(
        "sample",
        help="sample a state (or the base model) on its tasks' prompts with the paired seeded noises",
        description="Sample the state after task i on tasks 1..i (or, without a state, the base model on every "
        "task) into a sample set: task<NN>/p<i>-n<j>.png and index.csv, as the workflow's sampling jobs write. "
        "Tasks come from --tasks/--domain, or from the chain's manifests (each task's training prompt).",
    )
    sample.add_argument("state", nargs="?", metavar="STATE_DIR", help="the task directory to sample (none: the base)")
    sample.add_argument("--out", required=True, metavar="DIR", help="the sample set directory")
    add_config_arguments(sample)
    add_task_arguments(
        sample,
        "a prompt each task is sampled on (repeatable; {} becomes the task's concept), instead of its own",
    )
    add_sampling_arguments(sample)
    sample.set_defaults(handler=run)
