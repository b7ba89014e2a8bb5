"""``lorachain export``: a continual state or a modular merge as files other tools load (docs/export.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorachain.cli.common import fail


def _merge_from_config(args) -> tuple[list[str], str, dict, str]:
    """(concept dirs, merge method, its parameters, config key) of merge label --merge in --config."""
    import yaml

    from lorachain import plan

    config = yaml.safe_load(Path(args.config).read_text()) or {}
    merges = plan.modular(config).get("merges") or {}
    if args.merge not in merges:
        raise ValueError(f"{args.config}: --merge {args.merge!r} is not under modular.merges (there: {sorted(merges)})")
    sets = plan.modular_sets(config)
    name = args.set or (sets[0] if len(sets) == 1 else None)
    if name not in sets:
        raise ValueError(f"{args.config}: give --set, one of the modular sets {sets} (got {args.set!r})")
    k = args.k or max(plan.merge_sizes(config, name))
    if k not in plan.merge_sizes(config, name):
        raise ValueError(
            f"{args.config}: --k {k} is not among the merge sizes of set {name!r} {plan.merge_sizes(config, name)}, "
            "so that merge was not run"
        )
    block = merges[args.merge]
    dirs = plan.merged_concept_dirs(config, name, args.merge, k)
    return (
        dirs,
        block["method"],
        plan.parameters_of(block, leave_out=("method", "adapters")),
        f"modular.merges.{args.merge}",
    )


def _merge_options(args) -> tuple[list[str], str, dict, str]:
    if args.config:
        return _merge_from_config(args)
    try:
        params = json.loads(args.merge_params)
    except json.JSONDecodeError as error:
        raise ValueError(f"--merge-params is not a JSON mapping ({error})") from None
    return list(args.concepts), args.merge, params, f"--merge {args.merge}"


def run(args: argparse.Namespace) -> int:
    given = sum(bool(x) for x in (args.state, args.concepts, args.config))
    if given != 1 or (args.state is None and not args.merge):
        return fail("export", "give a state directory, or --merge with --concepts DIR ... or with --config FILE")

    from lorachain.export import ExportError, SvdSettings, export_merge, export_state, summary_lines
    from lorachain.methods import MergeError, MethodError
    from lorachain.modular import ModularError
    from lorachain.state import StateError

    try:
        svd = SvdSettings(rank=args.rank, energy=args.energy if args.rank is None else None)
        options = {"formats": args.format, "svd": svd, "base_model": args.base_model}
        if args.state:
            record = export_state(args.state, args.out, **options)
        else:
            dirs, method, params, key = _merge_options(args)
            record = export_merge(dirs, method, params, args.out, merge_key=key, **options)
    except (ExportError, StateError, MergeError, MethodError, ModularError, ValueError, OSError) as error:
        return fail("export", str(error))
    print("\n".join(summary_lines(record, args.out)))
    return 0


def register(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="write a continual state or a modular merge as a diffusers / kohya LoRA or a fused U-Net",
        description="Export a continual state (its task directory) or a modular merge (concept state "
        "directories and a merge method, or a config file and merge label) as a diffusers LoRA file, "
        "the same in kohya keys (ComfyUI, AUTOMATIC1111) and/or a fused U-Net, with a model card. "
        "Exact where the state is a sum of low-rank terms; otherwise a truncated SVD whose error is "
        "printed and written to svd-errors.csv. Relative paths are read from the current directory "
        "(the workflow's directory).",
    )
    parser.add_argument("state", nargs="?", metavar="STATE_DIR", help="a continual task directory (results/.../taskNN)")
    parser.add_argument("--merge", metavar="NAME", help="merge method (with --concepts) or merge label (with --config)")
    parser.add_argument(
        "--concepts",
        nargs="+",
        metavar="DIR",
        help="concept state directories (or LoRA files, kohya/A1111 and peft ones included), in merge order",
    )
    parser.add_argument("--merge-params", default="{}", metavar="JSON", help="the merge's parameters (with --concepts)")
    parser.add_argument("--config", metavar="FILE", help="workflow config whose modular.merges holds --merge")
    parser.add_argument(
        "--set", metavar="NAME", help="the modular set (domain or mix) of --config (default: the only one)"
    )
    parser.add_argument("--k", type=int, metavar="K", help="how many concepts (with --config; default the largest k)")
    parser.add_argument(
        "--format",
        action="append",
        choices=("diffusers", "kohya", "unet", "transformer"),
        help="diffusers LoRA, kohya LoRA, fused U-Net or SD3/FLUX transformer (repeat for several; default: "
        "diffusers and kohya for a U-Net model, diffusers for SD3/FLUX)",
    )
    svd = parser.add_mutually_exclusive_group()
    svd.add_argument("--rank", type=int, metavar="R", help="SVD rank of every layer (deltas that are not exact)")
    svd.add_argument("--energy", type=float, default=0.99, metavar="E", help="SVD energy kept per layer (default 0.99)")
    parser.add_argument("--base-model", metavar="DIR", help="the base model (default: the state's manifest)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory")
    parser.set_defaults(handler=run)
