"""``lorachain inspect``: cosine similarity and sign conflicts of LoRA files' deltas (BlockLoRA Figure 4)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorachain.cli.common import fail


def run(args: argparse.Namespace) -> int:
    if len(args.files) < 2:
        given = f" (got only {args.files[0]})" if args.files else ""
        return fail("inspect", f"needs at least 2 LoRA files to compare{given}")
    if args.names is not None and len(args.names) != len(args.files):
        return fail("inspect", f"--names has {len(args.names)} name(s) for {len(args.files)} file(s)")

    from lorachain.lora import LoraFileError, check_compatible, check_fits_unet, read_lora, unet_skeleton

    try:
        files = [read_lora(path) for path in args.files]
        check_compatible(files)
    except LoraFileError as error:
        return fail("inspect", str(error))
    if args.base is not None:
        try:
            unet = unet_skeleton(args.base)
        except (OSError, ValueError) as error:
            return fail("inspect", f"--base {args.base}: no diffusers U-Net config there ({error})")
        try:
            for lora in files:
                check_fits_unet(lora, unet)
        except LoraFileError as error:
            return fail("inspect", f"{error} (--base {args.base})")

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
        return fail("inspect", str(error))

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


def register(commands) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="compare LoRA files: cosine similarity and sign conflicts of their deltas",
        description="Compare LoRA files as the BlockLoRA paper's Figure 4 does: layer-wise cosine similarity "
        "of the deltas and the fraction of entries with sign conflicts when merging the first k files.",
    )
    inspect.add_argument(
        "files", nargs="+", metavar="LORA", help="LoRA safetensors files (diffusers, peft or kohya / A1111 layout)"
    )
    inspect.add_argument(
        "--names", nargs="+", metavar="NAME", help="one label per file (default: shortest distinguishing path)"
    )
    inspect.add_argument("--out", metavar="DIR", help="write CSV tables and PNG plots here")
    inspect.add_argument(
        "--base",
        metavar="MODEL",
        help="a diffusers pipeline (directory or hub id): refuse files whose layers its U-Net does not have",
    )
    inspect.set_defaults(handler=run)
