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

``lorachain train | sample | merge``
    One experiment without Snakemake (:mod:`lorachain.cli.train`, :mod:`lorachain.cli.sample`,
    :mod:`lorachain.cli.merge`): train one task of a chain (``--previous``) or one modular concept
    (``--slot``), sample a state or the base model, merge concept states and sample the merge; the
    workflow config's blocks (``--config``) or flags, checked as the dry-run checks them.

``lorachain export STATE_DIR | --merge NAME (--concepts DIR ... | --config FILE) --out DIR``
    Writes a continual state or a modular merge as a diffusers LoRA file, the same in kohya keys
    and/or a fused U-Net (``--format``), with a model card (:mod:`lorachain.export`, docs/export.md).

Exit codes: 0 done, 2 unusable input (fewer than two files, unreadable or incompatible files; the
message names the file), as argparse does for bad arguments. Each subcommand is a module of
this package (:data:`SUBCOMMANDS`).
"""

from __future__ import annotations

import argparse
import os

from lorachain.cli import export, inspect, merge, rehearsal, sample, train
from lorachain.cli.common import EXIT_BAD_INPUT

# Each subcommand is a module with register(commands) (its parser, handler=run) and run(args) -> int.
SUBCOMMANDS = (inspect, rehearsal, train, sample, merge, export)
__all__ = ["EXIT_BAD_INPUT", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorachain", description="Continual and modular LoRA personalisation tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
