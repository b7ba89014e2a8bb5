"""Figures of `lorachain export` (docs/export.md, issue 15): file sizes and SVD errors on the
miniature world's states and merges, and export time at SDXL's shapes.

1. Every continual run's final state and every merge at its largest k in a finished demo run
   (``--workdir``, default /tmp/demo: results/<domain>/<method>/order0-seed0/taskNN and
   results/<set>/modular/merges/<merge>/k<k>/merge.json): the exact export's rank and diffusers
   file size where the method declares low-rank terms, and for every source the SVD export at
   ``--ranks`` (its overall relative Frobenius error and file size; forced for exact sources too,
   to show what a rank cap would cost them).
2. SDXL base's 560 attention projections (built on the meta device from the published config, as
   benchmarks/merge_speed.py does), 10 tasks of random rank-64 factors: the exact export
   (concatenation to rank 640, diffusers and kohya files written) and the SVD export at rank 64 of
   the summed delta. ``--sdxl-layers`` layers (evenly spaced per shape) are exported and the time
   extrapolated per shape to all 560; file sizes scale exactly with the layers.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/export.py [--workdir /tmp/demo] [--sdxl-layers 140]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import extrapolation, layer_subset, sdxl_layer_shapes  # noqa: E402

from lorachain.export import (  # noqa: E402
    DIFFUSERS_FILE,
    ExportSource,
    SvdSettings,
    export_source,
    svd_factors,
)
from lorachain.export.sources import merge_source, state_source  # noqa: E402
from lorachain.lora import LayerAdapter  # noqa: E402
from lorachain.torch_env import torch  # noqa: E402

SKIPPED = {"base", "tasks", "modular"}


def world_sources(results: Path) -> list[tuple[str, callable]]:
    """(label, source factory) of every final state and every merge at its largest k."""
    found = []
    for domain in sorted(
        p for p in results.iterdir() if p.is_dir() and p.name not in {"benchmarks", "figures", "tables"}
    ):
        for method in sorted(p for p in domain.iterdir() if p.is_dir() and p.name not in SKIPPED):
            for run in sorted(method.glob("order*-seed*")):
                last = sorted(run.glob("task[0-9][0-9]"))[-1]
                found.append((f"{domain.name}/{method.name} ({last.name})", lambda last=last: state_source(last)))
        for merge in sorted((domain / "modular" / "merges").glob("*")):
            largest = max(merge.glob("k*/merge.json"), key=lambda p: int(p.parent.name[1:]))
            record = json.loads(largest.read_text())
            found.append(
                (
                    f"{domain.name}/merge {merge.name} (k={record['k']})",
                    lambda r=record, m=merge.name: merge_source(r["concepts"], r["method"], r["params"], m),
                )
            )
    return found


def world_table(workdir: Path, ranks: list[int]) -> None:
    os.chdir(workdir)  # states record their paths relative to the workflow's directory
    header = "| source | method | exact rank | exact bytes | " + " | ".join(f"SVD r={r}: error, bytes" for r in ranks)
    print(header + " |\n|" + "---|" * (4 + len(ranks)))
    with tempfile.TemporaryDirectory() as scratch:
        for label, make in world_sources(Path("results")):
            source = make()
            cells = [label, source.method["name"], "", "-"]
            if source.terms is not None:
                record = export_source(source, f"{scratch}/exact", formats=("diffusers",))
                cells[2:4] = [str(record["rank"]["max"]), str(record["files"][DIFFUSERS_FILE])]
            else:
                cells[2] = "- (SVD)"
            dense = dataclasses.replace(source, terms=None)
            for rank in ranks:
                record = export_source(dense, f"{scratch}/r{rank}", formats=("diffusers",), svd=SvdSettings(rank=rank))
                cells.append(f"{record['relative_error']:.3f}, {record['files'][DIFFUSERS_FILE]}")
            print("| " + " | ".join(cells) + " |")


def sdxl_source(shapes, tasks: int, rank: int) -> ExportSource:
    generator = torch.Generator().manual_seed(0)
    terms = {
        name: [
            (
                1.0,
                LayerAdapter(
                    A=torch.randn(rank, n_in, generator=generator) / n_in**0.5,
                    B=torch.randn(n_out, rank, generator=generator) * 1e-2,
                    scale=1.0,
                ),
            )
            for _ in range(tasks)
        ]
        for name, n_out, n_in in shapes
    }

    def dense():
        return {name: sum(c * a.delta() for c, a in layer) for name, layer in terms.items()}

    item = {"concept": None, "train_prompt": None, "token": None, "directory": None}
    return ExportSource(
        kind="benchmark",
        location="random SDXL factors",
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        architecture="StableDiffusionXLPipeline",
        method={"name": "merge_init", "params": {}},
        items=[item] * tasks,
        terms=terms,
        dense=dense,
    )


def sdxl_timing(layers: int, tasks: int, rank: int, svd_layers: int) -> None:
    shapes = sdxl_layer_shapes()
    chosen = layer_subset(shapes, layers)
    source = sdxl_source(chosen, tasks, rank)
    threads = torch.get_num_threads()
    print(f"\nSDXL: {len(chosen)} of {len(shapes)} attention layers, {tasks} tasks x rank {rank}, {threads} threads")
    with tempfile.TemporaryDirectory() as scratch:
        for formats in (("diffusers",), ("diffusers", "kohya")):
            started = time.perf_counter()
            record = export_source(source, f"{scratch}/{'-'.join(formats)}", formats=formats)
            seconds = time.perf_counter() - started
            scale = len(shapes) / len(chosen)
            sizes = ", ".join(
                f"{name} {size / 1e9:.2f} GB measured ({size * scale / 1e9:.2f} GB for 560)"
                for name, size in record["files"].items()
            )
            print(
                f"  exact export ({'+'.join(formats)}), rank {record['rank']['max']}: {seconds:.1f} s measured, "
                f"~{seconds * scale:.0f} s for 560 layers; {sizes}"
            )
    timed = layer_subset(shapes, svd_layers)
    seconds_by_shape: dict = {}
    for name, n_out, n_in in timed:
        adapters = source.terms.get(name) or sdxl_source([(name, n_out, n_in)], tasks, rank).terms[name]
        started = time.perf_counter()
        delta = sum(c * a.delta() for c, a in adapters)
        svd_factors(name, delta, SvdSettings(rank=rank))
        seconds_by_shape[(n_out, n_in)] = seconds_by_shape.get((n_out, n_in), 0.0) + time.perf_counter() - started
    total = extrapolation(timed, shapes, seconds_by_shape)
    per_shape = ", ".join(
        f"{o}x{i}: {s / sum(1 for _, a, b in timed if (a, b) == (o, i)):.2f} s"
        for (o, i), s in seconds_by_shape.items()
    )
    print(
        f"  SVD export at rank {rank} (dense sum of the {tasks} tasks, then the float64 Gram eigendecomposition): "
        f"per layer "
        f"{per_shape}; ~{total:.0f} s for 560 layers (extrapolated from {len(timed)})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/demo", help="a finished demo run's directory")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--sdxl-layers", type=int, default=140, help="SDXL layers exported (of 560)")
    parser.add_argument("--svd-layers", type=int, default=8, help="SDXL layers whose SVD is timed")
    parser.add_argument("--skip-world", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.skip_world:
        world_table(Path(args.workdir), args.ranks)
    sdxl_timing(args.sdxl_layers, tasks=10, rank=64, svd_layers=args.svd_layers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
