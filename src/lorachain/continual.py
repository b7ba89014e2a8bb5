"""Continual summaries of the score matrix a[j, i] = score on task j after training task i (j <= i).

Alignment. Within one run, rows and columns are sequence positions: row j is the j-th task the
run learned (which concept that is depends on the run's order). S, F and P are computed per run on
that matrix and then averaged over runs; heatmaps and curves average matrices over runs by
sequence position too (row 1 is always "the first task learned"). The base model has no sequence:
its score belongs to a concept, and is placed at the positions where each run learned that
concept. ``matrix_frame`` keeps both the position and the concept of every entry, so a
concept-aligned view is one ``groupby`` away.

Definitions (docs/metrics.md#continual-summaries), with T tasks and a the T x T matrix of one run:
- average score  S = mean_j a[j, T]
- forgetting     F = mean_j (max_{k >= j} a[j, k] - a[j, T]); two conventions:
  ``F_ref`` divides by T and includes the last task (whose term is 0), as the reference code does;
  ``F`` is the usual one over the T - 1 earlier tasks (undefined for T = 1).
- plasticity     P = mean_j a[j, j]
Standard deviations over runs are population ones (ddof = 0), so a single run reports 0.
"""

from __future__ import annotations

import math

import numpy as np

SUMMARIES = ("S", "F", "F_ref", "P")
SUMMARY_LABELS = {
    "S": "average score after the last task (S)",
    "F": "forgetting over the first T-1 tasks (F, usual convention)",
    "F_ref": "forgetting averaged over all T tasks (F_ref, reference code's convention)",
    "P": "plasticity: score of each task right after learning it (P)",
}
# Rows of scores.csv: one per (model, after_task, task, metric) of a run.
RUN_KEYS = ("method", "order", "seed")


class SummaryError(ValueError):
    """A score matrix or score table that cannot be summarised; names the source."""


def check_matrix(a: np.ndarray, source: str = "score matrix") -> np.ndarray:
    a = np.asarray(a, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise SummaryError(f"{source}: expected a non-empty T x T matrix, got shape {a.shape}")
    learned = np.triu(np.ones_like(a, dtype=bool))  # j <= i
    if not np.isfinite(a[learned]).all():
        bad = np.argwhere(learned & ~np.isfinite(a))[0]
        raise SummaryError(
            f"{source}: a[{bad[0] + 1}, {bad[1] + 1}] (task {bad[0] + 1} after task {bad[1] + 1}) "
            "is missing or not finite"
        )
    return a


def average_score(a: np.ndarray) -> float:
    return float(np.mean(a[:, -1]))


def forgetting(a: np.ndarray, convention: str = "usual") -> float:
    """``usual``: mean over the first T-1 tasks; ``reference``: sum over all T tasks divided by T."""
    T = a.shape[0]
    drops = [np.max(a[j, j:]) - a[j, -1] for j in range(T)]
    if convention == "reference":
        return float(np.sum(drops) / T)
    if convention == "usual":
        return float(np.mean(drops[:-1])) if T > 1 else math.nan
    raise SummaryError(f"forgetting convention {convention!r}: use 'usual' or 'reference'")


def plasticity(a: np.ndarray) -> float:
    return float(np.mean(np.diag(a)))


def summarize_matrix(a: np.ndarray, source: str = "score matrix") -> dict[str, float]:
    a = check_matrix(a, source)
    return {"S": average_score(a), "F": forgetting(a, "usual"), "F_ref": forgetting(a, "reference"), "P": plasticity(a)}


def run_matrix(scores, metric: str, num_tasks: int, source: str) -> np.ndarray:
    """The T x T matrix of one run and metric from its scores rows (after_task, task, score)."""
    rows = scores[scores["metric"] == metric]
    a = np.full((num_tasks, num_tasks), np.nan)
    for after, task, value in zip(rows["after_task"], rows["task"], rows["score"]):
        if not (1 <= task <= after <= num_tasks):
            raise SummaryError(
                f"{source}: entry task {task} after task {after} lies outside 1 <= task <= after <= {num_tasks}"
            )
        if not np.isnan(a[task - 1, after - 1]):
            raise SummaryError(f"{source}: two scores for {metric} on task {task} after task {after}")
        a[task - 1, after - 1] = value
    return check_matrix(a, f"{source} ({metric})")


def matrix_frame(run_scores: dict[tuple, "object"], metrics: list[str], num_tasks: int):
    """Long frame of every run's matrix: method, order, seed, metric, task (position), after_task,
    concept, score. `run_scores` maps (method, order, seed) to that run's scores frame and source path."""
    import pandas as pd

    frames = []
    for key, (scores, source) in sorted(run_scores.items(), key=lambda item: tuple(map(str, item[0]))):
        for metric in metrics:
            run_matrix(scores, metric, num_tasks, source)  # validates completeness
        part = scores[scores["metric"].isin(metrics)][["metric", "task", "after_task", "concept", "score"]].copy()
        for name, value in zip(RUN_KEYS, key):
            part[name] = value
        frames.append(part)
    return pd.concat(frames, ignore_index=True)[[*RUN_KEYS, "metric", "task", "after_task", "concept", "score"]]


def summary_table(
    matrices, base_scores, methods: list[str], metrics: list[str], num_tasks: int, runs: list[tuple[int, int]]
):
    """One row per (method, metric): mean and std over runs of S, F, F_ref, P, the number of runs,
    and the base model's mean score over the domain's concepts. A (method, run) without a complete
    matrix is an error, never a silently shorter mean."""
    import pandas as pd

    base_by_concept = base_scores.set_index(["metric", "concept"])["score"]
    rows = []
    for method in methods:
        for metric in metrics:
            per_run = []
            for order, seed in runs:
                part = matrices[
                    (matrices["method"] == method)
                    & (matrices["order"] == order)
                    & (matrices["seed"] == seed)
                    & (matrices["metric"] == metric)
                ]
                if part.empty:
                    raise SummaryError(
                        f"no scores for method {method}, order {order}, seed {seed}, metric {metric}: "
                        "that run is missing"
                    )
                a = run_matrix(part, metric, num_tasks, f"method {method} order {order} seed {seed}")
                per_run.append(summarize_matrix(a))
            row = {"method": method, "metric": metric, "n_runs": len(per_run)}
            for name in SUMMARIES:
                values = np.array([summary[name] for summary in per_run], dtype=float)
                row[f"{name}_mean"] = float(np.mean(values))
                row[f"{name}_std"] = float(np.std(values))
            try:
                row["base"] = float(base_by_concept.loc[metric].mean())
            except KeyError:
                raise SummaryError(f"base model has no {metric} scores") from None
            rows.append(row)
    columns = ["method", "metric", *(f"{n}_{s}" for n in SUMMARIES for s in ("mean", "std")), "n_runs", "base"]
    return pd.DataFrame(rows, columns=columns)


def markdown_table(table, title: str) -> str:
    """The summary table as Markdown, mean ± std, with the conventions spelled out below it."""
    header = ["method", "metric", *SUMMARIES, "base", "runs"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        cells = [row.method, row.metric]
        for name in SUMMARIES:
            mean, std = getattr(row, f"{name}_mean"), getattr(row, f"{name}_std")
            cells.append("n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}")
        cells += [f"{row.base:.4f}", str(row.n_runs)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        *(f"- {name}: {label}" for name, label in SUMMARY_LABELS.items()),
        "- base: the base model's mean score over the domain's concepts",
        "- ± is the population standard deviation over runs (orders x seeds)",
        "",
    ]
    return "\n".join(lines)


def mean_matrices(matrices, metric: str, num_tasks: int) -> dict[str, np.ndarray]:
    """Per method, a[j, i] averaged over runs by sequence position (NaN above the diagonal)."""
    result = {}
    part = matrices[matrices["metric"] == metric]
    for method, rows in part.groupby("method", sort=False):
        mean = rows.groupby(["task", "after_task"])["score"].mean()
        a = np.full((num_tasks, num_tasks), np.nan)
        for (task, after), value in mean.items():
            a[task - 1, after - 1] = value
        result[method] = a
    return result


def first_task_curves(matrices, base_scores, metric: str):
    """Per method: (mean, std) over runs of a[1, i] for i = 1..T; and the base model's score on
    each run's first task, averaged over runs (the dashed line of the paper's Figure 2)."""
    part = matrices[(matrices["metric"] == metric) & (matrices["task"] == 1)]
    curves = {}
    for method, rows in part.groupby("method", sort=False):
        grouped = rows.groupby("after_task")["score"]
        curves[method] = (grouped.mean().sort_index().to_numpy(), grouped.std(ddof=0).sort_index().to_numpy())
    first_concepts = part.drop_duplicates(["method", "order", "seed"])["concept"]
    base = base_scores[base_scores["metric"] == metric].set_index("concept")["score"]
    return curves, float(base.loc[list(first_concepts)].mean())
