"""Memory and cost of SD3.5-medium and FLUX.1-dev (and SDXL for comparison), from their real configs.

The denoisers are built by diffusers' own classes on the meta device from the published configs
stored in src/lorachain/models/reference_configs (no weights, no download), and
:mod:`lorachain.models.footprint` counts from their shapes: parameters, the linear layers the
default LoRA targets select, LoRA bytes per task (fp32, as lorachain writes states), a continual
chain's state bytes, and the weight memory of training and sampling (activations not estimated).

The 10-task fold is timed on this CPU with the methods' own ``fold`` (merge_init: the sum of the
B @ A products, as naive / ortho_init fold; magmax: the per-element larger-magnitude selection)
on synthetic factors, replayed as ``lorachain.state.fold_state`` replays a chain. A full-size
fold of FLUX.1-dev holds 10 GB of dense deltas, so each run folds a few layers of every distinct
layer shape and scales the time by each shape's layer count (the cost of a layer's fold depends
only on its shape). Each run is a fresh process (its resident high-water mark is the measured
peak); the full-model peak is computed from the live tensors (footprint.fold_peak_bytes). The
machine may be shared: the 1-minute load average is printed with every timing.

Usage: ``python benchmarks/transformer_memory.py [--threads 1 2] [--per-shape 3] [--no-fold]``
(CPU; a few minutes with the fold timings, seconds without). Prints markdown tables only.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
from collections import Counter  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

from lorachain.models.footprint import (  # noqa: E402
    ADAMW_STATE_BYTES,
    FOLD_TEMPORARIES,
    REFERENCE_MODELS,
    fold_peak_bytes,
    fold_subset,
    footprint,
    measure_fold,
)

RANKS = (16, 64)
TASKS = 10


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def figure_rows(footprints) -> list[tuple[str, list[str]]]:
    rows = [
        ("hub id", [f"`{f.model.hub_id}`" for f in footprints]),
        ("denoiser", [f.model.denoiser_class for f in footprints]),
        ("denoiser parameters", [count(f.denoiser_params) for f in footprints]),
        ("+ persistent buffers", [count(f.denoiser_buffers) if f.denoiser_buffers else "0" for f in footprints]),
        (
            "denoiser bf16 / fp32",
            [f"{gb(2 * f.denoiser_elements)} / {gb(4 * f.denoiser_elements)}" for f in footprints],
        ),
        ("default targets", [", ".join(f.model.targets) for f in footprints]),
        ("targeted linear layers", [str(len(f.layers)) for f in footprints]),
        ("targeted weights", [count(f.targeted_weights) for f in footprints]),
    ]
    for rank in RANKS:
        rows += [
            (f"LoRA parameters / task, rank {rank}", [count(f.lora_params(rank)) for f in footprints]),
            (
                f"LoRA file / task (fp32), rank {rank}",
                [gb(f.lora_tensor_bytes(rank) + f.lora_header_bytes(rank)) for f in footprints],
            ),
        ]
    for rank in RANKS:
        rows += [
            (f"state / task, rank {rank}", [gb(f.task_state_bytes(rank)) for f in footprints]),
            (f"{TASKS}-task chain states, rank {rank}", [gb(f.chain_state_bytes(rank, TASKS)) for f in footprints]),
        ]
    rows += [
        ("folded dense deltas (fp32)", [gb(4 * f.targeted_weights) for f in footprints]),
        (
            "text encoders (parameters)",
            [" + ".join(f"{name} {count(n)}" for name, n in f.model.encoders) for f in footprints],
        ),
        ("VAE (parameters)", [count(f.model.vae_params) for f in footprints]),
        ("all weights, bf16", [gb(f.sampling_bytes()) for f in footprints]),
        ("all weights, fp32", [gb(sum(f.weight_bytes(4).values())) for f in footprints]),
    ]
    for rank in RANKS:
        for optimizer in ADAMW_STATE_BYTES:
            cost = [f.training_bytes(rank, optimizer) for f in footprints]
            rows.append(
                (
                    f"training, rank {rank}, {optimizer}: encoding / steps",
                    [f"{gb(c['encoding'])} / {gb(c['steps'])}" for c in cost],
                )
            )
    rows.append(("sampling (bf16 pipeline)", [gb(f.sampling_bytes()) for f in footprints]))
    return rows


def print_table(header: list[str], rows) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, values in rows:
        print("| " + " | ".join([name, *values]) + " |")


def fold_in_fresh_process(groups, method: str, rank: int, threads: int, repeats: int) -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure_fold, groups, method, rank, TASKS, threads, repeats).result()


def fold_row(f, groups, method: str, rank: int, threads: int, repeats: int) -> list[str]:
    """One fold measurement in a fresh process, scaled from the subset `groups` to every layer."""
    result = fold_in_fresh_process(groups, method, rank, threads, repeats)
    shape_counts = Counter((layer.out_features, layer.in_features) for layer in f.layers)
    scaled = sum(seconds * shape_counts[shape] / len(groups[shape]) for shape, seconds in result["seconds"].items())
    subset = [layer for members in groups.values() for layer in members]
    subset_live = fold_peak_bytes(subset, rank, method, task_files=False)  # its factors predate the fold
    return [
        method,
        str(rank),
        str(result["threads"]),
        f"{scaled:.0f} s",
        gb(fold_peak_bytes(f.layers, rank, method)),
        f"{len(subset)}: {sum(result['seconds'].values()):.2f} s",
        f"{gb(result['peak_bytes'])} / {gb(subset_live)}",
        f"{result['load_before']:.2f} / {result['load_after']:.2f}",
    ]


def fold_rows(footprints, threads_list, per_shape: int, repeats: int) -> list[tuple[str, list[str]]]:
    rows = []
    for f in footprints:
        groups = fold_subset(f.layers, per_shape)
        for method in FOLD_TEMPORARIES:
            for rank in RANKS:
                for threads in threads_list:
                    rows.append((f.model.name, fold_row(f, groups, method, rank, threads, repeats)))
                    print(f"  measured {f.model.name} {method} rank {rank} threads {threads}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads of the fold timings")
    parser.add_argument("--per-shape", type=int, default=3, help="layers of each distinct shape folded (then scaled)")
    parser.add_argument("--repeats", type=int, default=3, help="fold timings: the fastest of this many runs")
    parser.add_argument("--no-fold", action="store_true", help="skip the fold timings")
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    footprints = [footprint(name) for name in REFERENCE_MODELS]
    print(f"## Figures from the published configs (meta device; {TASKS} tasks)\n")
    print_table(["", *(f.model.name for f in footprints)], figure_rows(footprints))
    print(
        "\nTraining: the pipeline's weights in bf16 while the task's images and prompts are encoded (once per "
        "task), then the bf16 denoiser with the LoRA's fp32 factors, gradients and AdamW states (8-bit: one byte "
        "per state); activations are not estimated. Sampling: every weight of the pipeline in bf16, no offloading."
    )
    if args.no_fold:
        return 0
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\n## {TASKS}-task fold on this CPU ({cpu})\n")
    rows = fold_rows(footprints, args.threads, args.per_shape, args.repeats)
    print()
    print_table(
        [
            "model",
            "fold",
            "rank",
            "threads",
            "full model (scaled)",
            "full-model peak (live tensors)",
            "subset layers: time",
            "subset peak: measured RSS / live tensors",
            "load before / after",
        ],
        rows,
    )
    print(
        f"\nEach run folds {args.per_shape} layers of every distinct layer shape ({TASKS} tasks of random fp32 "
        "factors, lorachain.state.fold_state's replay with the method's fold; the fastest of "
        f"{args.repeats} runs) and scales the time by each shape's layer count. The full-model peak counts the "
        "live tensors: every layer's folded fp32 delta, the fold's "
        "temporaries at the largest layer and one task's LoRA (file bytes and factors); the subset's measured "
        "resident high-water mark above the factors shows the allocator's overhead on top of its live tensors."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
