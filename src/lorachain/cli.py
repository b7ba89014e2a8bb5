"""The ``lorachain`` command.

Subcommands:

``lorachain inspect A.safetensors B.safetensors ... [--names N1 N2 ...] [--out DIR]``
    Reads two or more LoRA files, prints a short summary (files, rank, alpha, layers, layer-wise
    cosine similarity of the deltas, sign-conflict fractions for k = 2..N; BlockLoRA paper Figure 4)
    and with ``--out`` writes ``cosine.csv`` (one row per layer), ``cosine_pairs.csv`` (long),
    ``sign_conflicts.csv``, ``cosine.png`` and ``sign_conflicts.png``.

``lorachain rehearsal DIR --dreambooth ROOT [--paper config/config.yaml]``
    Writes local stand-ins of the same classes for every model the paper config names, a generated
    UnlearnCanvas tree and ``DIR/config.yaml``: the paper config with only models, dataset roots
    and sizes substituted (:mod:`lorachain.rehearsal`), and prints the Snakemake command that runs
    it end to end on a CPU.

Exit codes: 0 done, 2 unusable input (fewer than two files, unreadable or incompatible files; the
message names the file), as argparse does for bad arguments. Each subcommand is a function
``_<name>(args) -> int`` registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _fail(command: str, message: str) -> int:
    print(f"lorachain {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _inspect(args: argparse.Namespace) -> int:
    if len(args.files) < 2:
        given = f" (got only {args.files[0]})" if args.files else ""
        return _fail("inspect", f"needs at least 2 LoRA files to compare{given}")
    if args.names is not None and len(args.names) != len(args.files):
        return _fail("inspect", f"--names has {len(args.names)} name(s) for {len(args.files)} file(s)")

    from lorachain.lora import LoraFileError, check_compatible, read_lora

    try:
        files = [read_lora(path) for path in args.files]
        check_compatible(files)
    except LoraFileError as error:
        return _fail("inspect", str(error))

    from lorachain.merging.diagnostics import (
        cosine_tables,
        plot_cosine_heatmap,
        plot_sign_conflicts,
        sign_conflicts,
        unique_labels,
    )

    names = list(args.names) if args.names else unique_labels([f.path for f in files])
    try:
        cosine, pairs = cosine_tables(files, names)
        conflicts = sign_conflicts(files, names)
    except ValueError as error:  # e.g. duplicate --names
        return _fail("inspect", str(error))

    print(f"{len(files)} LoRA files, {len(files[0].adapters)} layers each")
    width = max(len(n) for n in names)
    for name, lora in zip(names, files):
        alpha = "per-layer" if lora.alpha is None else f"{lora.alpha:g}"
        notes = f"  ({'; '.join(lora.notes)})" if lora.notes else ""
        print(f"  {name:{width}}  rank {lora.rank:<4} alpha {alpha:<9} {len(lora.adapters)} layers  {lora.path}{notes}")
    mean = cosine["mean_cosine"]
    print(
        f"layer-wise cosine similarity of deltas (mean over pairs): mean {mean.mean():.4f}, "
        f"max {mean.max():.4f}; largest |cosine| of any pair in any layer {cosine['max_abs_cosine'].max():.4f}"
    )
    print("sign conflicts among the first k LoRAs (fraction of touched entries):")
    for row in conflicts.itertuples():
        print(f"  k={row.k:<3} {row.fraction:.4f}  ({row.conflicting_entries} of {row.active_entries})")

    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cosine.to_csv(out / "cosine.csv")
        pairs.to_csv(out / "cosine_pairs.csv", index=False)
        conflicts.to_csv(out / "sign_conflicts.csv", index=False)
        plot_cosine_heatmap(cosine, out / "cosine.png")
        plot_sign_conflicts(conflicts, out / "sign_conflicts.png")
        print(f"wrote cosine.csv, cosine_pairs.csv, sign_conflicts.csv, cosine.png, sign_conflicts.png to {out}")
    return 0


def _rehearsal(args: argparse.Namespace) -> int:
    import yaml

    from lorachain.rehearsal import build_stand_ins, rehearsal_config

    paper_file, dreambooth = Path(args.paper), Path(args.dreambooth)
    if not paper_file.is_file():
        return _fail("rehearsal", f"--paper {paper_file}: no such file")
    if not (dreambooth / "prompts_and_classes.txt").is_file():
        return _fail("rehearsal", f"--dreambooth {dreambooth}: not a DreamBooth dataset (no prompts_and_classes.txt)")
    paper = yaml.safe_load(paper_file.read_text())
    out = Path(args.directory).absolute()
    config = rehearsal_config(paper, build_stand_ins(out / "stand-ins", paper), dreambooth)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {out / 'config.yaml'} and its stand-ins in {out / 'stand-ins'}; run it with")
    print(f"  snakemake --profile profiles/local --configfile={out / 'config.yaml'} --directory {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorachain", description="Continual and modular LoRA personalisation tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="compare LoRA files: cosine similarity and sign conflicts of their deltas",
        description="Compare LoRA files as the BlockLoRA paper's Figure 4 does: layer-wise cosine similarity "
        "of the deltas and the fraction of entries with sign conflicts when merging the first k files.",
    )
    inspect.add_argument("files", nargs="+", metavar="LORA", help="LoRA safetensors files (diffusers / peft layout)")
    inspect.add_argument(
        "--names", nargs="+", metavar="NAME", help="one label per file (default: shortest distinguishing path)"
    )
    inspect.add_argument("--out", metavar="DIR", help="write CSV tables and PNG plots here")
    inspect.set_defaults(handler=_inspect)
    rehearsal = commands.add_parser(
        "rehearsal",
        help="write a CPU rehearsal of the paper config (local stand-ins for its models)",
        description="Write local stand-ins of the same classes for every model of the paper config and "
        "DIR/config.yaml, the paper config with only its models, dataset roots and sizes substituted.",
    )
    rehearsal.add_argument(
        "directory", metavar="DIR", help="where the stand-ins and the config go (the run's working directory)"
    )
    rehearsal.add_argument(
        "--dreambooth", required=True, metavar="ROOT", help="a DreamBooth dataset directory (prompts_and_classes.txt)"
    )
    rehearsal.add_argument(
        "--paper",
        default="config/config.yaml",
        metavar="YAML",
        help="the config to rehearse (default config/config.yaml)",
    )
    rehearsal.set_defaults(handler=_rehearsal)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
