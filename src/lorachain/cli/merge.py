"""``lorachain merge``: merge concept states and sample the merged model, without Snakemake.

A thin wrapper over :func:`lorachain.modular.merge_and_sample`, the function the workflow's
merge_and_sample job calls: the k concepts given (in slot order, as the workflow's first k) are
merged by a merge entry (``modular.merges.<label>`` of --config, or a merge method's name with its
defaults) and sampled on the modular regime's prompts with the paired noises. Writes
``<out>/samples`` (a sample set) and ``<out>/merge.json`` (what was merged, the merge's time), the
layout of the workflow's merge directories; with ``--export DIR`` the merged result as LoRA files
too, through :func:`lorachain.export.export_merge` (what ``lorachain export --merge`` writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorachain.cli.experiment import (
    CliError,
    add_config_arguments,
    add_task_arguments,
    first_order,
    hand_made_task,
    load_config,
    run_experiment,
    set_flags,
    set_model,
    task_file,
    tasks_from,
    validate,
)
from lorachain.cli.sample import SAMPLING_FLAGS, add_sampling_arguments


def _concepts(directories: list[str]) -> list[dict]:
    from lorachain.state import read_manifest

    manifests = []
    for directory in directories:
        if not Path(directory).is_dir():
            raise CliError(f"{directory}: no such concept directory (give a concept's state directory)")
        manifests.append(read_manifest(directory))
    return manifests


def _merge_block(config: dict, label: str) -> tuple[str, dict]:
    """(merge method, its parameters) of ``modular.merges.<label>``, or of the merge method
    `label` with its defaults; checked by the merge registry."""
    from lorachain import plan
    from lorachain.methods import make_merge

    block = (config.get("modular") or {}).get("merges", {}).get(label, {"method": label})
    params = plan.parameters_of(block, leave_out=("method", "adapters"))
    merge = make_merge(block["method"], params, key=f"modular.merges.{label}")
    if merge.needs_layer_inputs:
        raise CliError(
            f"--merge {label}: {block['method']} merges on recorded layer inputs (Gram matrices), which "
            "lorachain merge does not record; run it in the workflow (rule record_layer_inputs)"
        )
    return block["method"], params


def _eval_prompts(config: dict, prompts: list[str] | None) -> dict:
    """The modular regime's templates: --prompt (for every kind) over modular.eval_prompts."""
    templates = dict((config.get("modular") or {}).get("eval_prompts") or {})
    if prompts:
        bad = [prompt for prompt in prompts if prompt.count("{}") != 1]
        if bad:
            raise CliError(f"--prompt {bad[0]!r}: a merge's prompt is a template holding the concept placeholder {{}}")
        templates = {"object": list(prompts), "style": list(prompts)}
    return templates


def _tasks(args: argparse.Namespace, config: dict, manifests: list[dict]) -> list:
    tasks = tasks_from(args, config)
    if tasks is not None:
        return tasks
    return [hand_made_task(m["concept"], m["train_prompt"]) for m in manifests]


def _export(args: argparse.Namespace, config: dict, name: str, params: dict) -> dict | None:
    """The merged result as LoRA files (diffusers and kohya keys, :func:`lorachain.export.export_merge`)."""
    if args.export is None:
        return None
    from lorachain import plan
    from lorachain.export import export_merge, summary_lines

    record = export_merge(
        list(args.concepts),
        name,
        params,
        args.export,
        merge_key=f"modular.merges.{args.merge}",
        base_model=plan.model_source(config),
    )
    print("\n".join(summary_lines(record, args.export)))
    return record


def _merge(args: argparse.Namespace) -> dict:
    from lorachain import plan
    from lorachain.modular import merge_and_sample

    if args.no_sample and args.export is None:
        raise CliError("--no-sample leaves nothing to do without --export DIR (the merged LoRA files)")
    if args.out is None and not args.no_sample:
        raise CliError("--out DIR is missing: where the merged model's samples/ and merge.json go")
    manifests = _concepts(args.concepts)
    config = load_config(args.config)
    set_model(config, args, default=manifests[0]["base_model"])
    set_flags(config, "sampling", args, SAMPLING_FLAGS)
    config = validate(config, ["model"])
    name, params = _merge_block(config, args.merge)
    tasks = _tasks(args, config, manifests)
    sampling = plan.stage_block(config, "sampling")
    if args.tasks is None and args.domain is None:
        sampling["prior_samples"] = False  # a hand-made task has no class word
    run = manifests[0].get("run", {})
    order = args.order if args.order is not None else (first_order(config) if args.domain else "")
    identity = {"model": args.merge, "method": name, "domain": args.domain or run.get("domain", ""), "order": order}
    exported = _export(args, config, name, params)
    if args.no_sample:
        return {"exported": exported["files"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with task_file(tasks, args.tasks) as path:
        return merge_and_sample(
            concept_dirs=list(args.concepts),
            gram_files=None,
            merge_name=name,
            merge_params=params,
            merge_key=f"modular.merges.{args.merge}",
            tasks_file=path,
            sampling=sampling,
            model_source=plan.model_source(config),
            vae=config["model"].get("vae"),
            output_dir=out / "samples",
            identity={**identity, "seed": run.get("seed", ""), "after_task": len(args.concepts)},
            merge_record=out / "merge.json",
            eval_prompts=_eval_prompts(config, args.prompt),
        )


def run(args: argparse.Namespace) -> int:
    from lorachain.export import ExportError

    return run_experiment("merge", args, _merge, (ExportError,))


def register(commands) -> None:
    merge = commands.add_parser(
        "merge",
        help="merge concept states with a merge method and sample the merged model",
        description="Merge the concept states given (trained with lorachain train --slot, or the workflow's "
        "modular concepts, in slot order) and sample the merged model on the modular regime's prompts: "
        "<out>/samples and <out>/merge.json, as the workflow's merge_and_sample job writes; with --export "
        "the merged LoRA files too (lorachain.export).",
    )
    merge.add_argument("concepts", nargs="+", metavar="CONCEPT_DIR", help="concept state directories, in order")
    merge.add_argument(
        "--merge", required=True, metavar="LABEL", help="a label of modular.merges, or a merge method's name"
    )
    merge.add_argument("--out", metavar="DIR", help="where samples/ and merge.json go")
    merge.add_argument(
        "--export", metavar="DIR", help="also write the merged result as LoRA files here (as lorachain export)"
    )
    merge.add_argument("--no-sample", action="store_true", help="only --export: write no samples")
    add_config_arguments(merge)
    add_task_arguments(
        merge,
        "an evaluation prompt template, {} is the concept (repeatable; default modular.eval_prompts, else "
        "BlockLoRA's 20)",
    )
    add_sampling_arguments(merge)
    merge.set_defaults(handler=run)
