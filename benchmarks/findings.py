"""The papers' findings on the miniature world, with 95 % bootstrap intervals.

    .venv/bin/snakemake --profile profiles/local --resources gpu=2 --configfile config/demo.yaml config/world.yaml
    .venv/bin/python benchmarks/findings.py            # reads results/ (or --results DIR)

Prints, from the workflow's own result files:
1. forgetting F (usual convention) of every continual method, and naive minus each other method,
   per domain and image metric; intervals resample runs (orders x seeds), paired by run;
2. plasticity P of ortho_init minus merge_init (paired by run);
3. the modular regime's identity (image metric) of every merge as k grows; there is one modular
   run per config, so these intervals resample the merged concepts, not runs;
4. the world LoRAs' mean pairwise cosine similarity and sign-conflict share (modular adapters).

With ``--modular-runs DIR DIR DIR`` (the results directories of modular runs that differ only in
``modular.seed``), it prints instead every merge's mean over the k concepts of each metric, per k,
with intervals over those runs, and the merge and recording times (their mean over runs); and,
for every composition table of those runs (``results/tables/<set>-composition-<name>-by-k.csv``),
every column (each placeholder's scores, the minimum and mean over members, the text metrics) per
merge and k, the base model's included, with intervals over the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lorachain import continual

RESAMPLES = 2000


def interval(values, statistic=np.mean, seed: int = 0) -> tuple[float, float, float]:
    """(statistic, 2.5 %, 97.5 %) of a percentile bootstrap over the values."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    draws = [statistic(values[rng.integers(len(values), size=len(values))]) for _ in range(RESAMPLES)]
    return float(statistic(values)), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def text(estimate: tuple[float, float, float]) -> str:
    return f"{estimate[0]:+.4f} [{estimate[1]:+.4f}, {estimate[2]:+.4f}]"


def per_run(matrices: pd.DataFrame, metric: str, statistic) -> pd.DataFrame:
    """method x run table of one summary statistic of each run's matrix."""
    part = matrices[matrices["metric"] == metric]
    num_tasks = int(part["task"].max())
    rows = []
    for (method, order, seed), run in part.groupby(["method", "order", "seed"]):
        a = continual.run_matrix(run, metric, num_tasks, f"{method} order{order}-seed{seed}")
        rows.append({"method": method, "run": f"order{order}-seed{seed}", "value": statistic(a)})
    return pd.DataFrame(rows).pivot(index="run", columns="method", values="value")


def continual_findings(results: Path, domain: str, metric: str) -> None:
    matrices = pd.read_csv(results / domain / "matrices.csv")
    forgetting = per_run(matrices, metric, lambda a: continual.forgetting(a, "usual"))
    plasticity = per_run(matrices, metric, continual.plasticity)
    base = pd.read_csv(results / domain / "base" / "scores.csv")
    base_score = base[base["metric"] == metric]["score"].mean()
    print(f"\n## {domain}, {metric}: {len(forgetting)} runs; base model score {base_score:.4f}")
    for method in forgetting.columns:
        print(f"  F {method:<12} {text(interval(forgetting[method]))}   P {text(interval(plasticity[method]))}")
    if "naive" in forgetting.columns:
        for method in forgetting.columns.drop("naive"):
            print(f"  F naive - {method:<12} {text(interval(forgetting['naive'] - forgetting[method]))}")
    if {"ortho_init", "merge_init"} <= set(plasticity.columns):
        print(f"  P ortho_init - merge_init {text(interval(plasticity['ortho_init'] - plasticity['merge_init']))}")


def modular_findings(results: Path, domain: str, metric: str) -> None:
    merges = sorted(path.parent.name for path in (results / domain / "modular" / "merges").glob("*/scores.csv"))
    if not merges:
        return
    print(f"\n## {domain} modular, {metric} by k (intervals over the merged concepts)")
    for merge in merges:
        scores = pd.read_csv(results / domain / "modular" / "merges" / merge / "scores.csv")
        scores = scores[scores["metric"] == metric]
        cells = []
        for k, group in scores.groupby("after_task"):
            cells.append(f"k={k}: {text(interval(group.groupby('task')['score'].mean()))}")
        print(f"  {merge:<22} " + "  ".join(cells))
    for adapter_dir in sorted((results / domain / "modular" / "diagnostics").glob("*")):
        cosine = pd.read_csv(adapter_dir / "cosine.csv")
        conflicts = pd.read_csv(adapter_dir / "sign_conflicts.csv")
        print(
            f"  diagnostics {adapter_dir.name:<22} mean pairwise cosine {cosine['mean_cosine'].mean():+.4f}, "
            f"sign-conflict fraction {conflicts['fraction'].mean():.4f}"
        )


def merge_run_means(results: Path, domain: str, metric: str) -> pd.DataFrame:
    """(merge, k) -> the mean over the k merged concepts of `metric`, for one modular run."""
    rows = []
    for path in sorted((results / domain / "modular" / "merges").glob("*/scores.csv")):
        scores = pd.read_csv(path)
        scores = scores[scores["metric"] == metric]
        for k, group in scores.groupby("after_task"):
            rows.append({"merge": path.parent.name, "k": int(k), "value": group.groupby("task")["score"].mean().mean()})
    return pd.DataFrame(rows, columns=["merge", "k", "value"])


TIMES = ("merge_s", "record_s")


def merge_times(results: Path, domain: str) -> pd.DataFrame:
    rows = []
    for path in sorted((results / domain / "modular" / "merges").glob("*/k*/merge.json")):
        record = json.loads(path.read_text())
        rows.append({"merge": path.parent.parent.name, "k": record["k"], **{key: record.get(key) for key in TIMES}})
    return pd.DataFrame(rows, columns=["merge", "k", *TIMES])


def modular_runs_findings(runs: list[Path], domain: str, metrics: list[str]) -> None:
    print(f"\n## {domain} modular over {len(runs)} runs (intervals over runs)")
    for metric in metrics:
        frame = pd.concat([merge_run_means(run, domain, metric).assign(run=i) for i, run in enumerate(runs)])
        if frame.empty:
            continue
        print(f"\n### {metric}: mean over the merged concepts")
        for merge, by_merge in frame.groupby("merge"):
            cells = [f"k={k}: {text(interval(group['value']))}" for k, group in by_merge.groupby("k")]
            print(f"  {merge:<22} " + "  ".join(cells))
    times = pd.concat([merge_times(run, domain) for run in runs]).groupby(["merge", "k"]).mean(numeric_only=True)
    print("\n### time (s, mean over runs): merge alone / the k concepts' recording")
    for (merge, k), row in times.iterrows():
        record = "n/a" if pd.isna(row["record_s"]) else f"{row['record_s']:.1f}"
        print(f"  {merge:<22} k={k}: {row['merge_s']:.3f} / {record}")


def composition_runs_findings(runs: list[Path]) -> None:
    """Every composition's by-k points over the runs: per column, merge and k, the mean and its
    interval over runs (the base model's at k = 0)."""
    for path in sorted((runs[0] / "tables").glob("*-composition-*-by-k.csv")):
        frame = pd.concat([pd.read_csv(run / "tables" / path.name).assign(run=i) for i, run in enumerate(runs)])
        print(f"\n## {path.name.removesuffix('-by-k.csv')} over {len(runs)} runs (intervals over runs)")
        for column, by_column in frame.groupby("column", sort=False):
            print(f"\n### {column}")
            for merge, by_merge in by_column.groupby("merge", sort=False):
                cells = [f"k={k}: {text(interval(group['score']))}" for k, group in by_merge.groupby("k")]
                print(f"  {merge:<22} " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--modular-runs", type=Path, nargs="+", help="results directories of modular runs")
    parser.add_argument("--metrics", nargs="+", default=["clip_i", "dino", "prior_drift_clip"])
    args = parser.parse_args()
    if args.modular_runs:
        modular_runs_findings(args.modular_runs, "objects", args.metrics)
        composition_runs_findings(args.modular_runs)
        return
    for domain, metric in (("objects", "dino"), ("styles", "csd")):
        if (args.results / domain / "matrices.csv").is_file():
            continual_findings(args.results, domain, metric)
            modular_findings(args.results, domain, metric)


if __name__ == "__main__":
    main()
