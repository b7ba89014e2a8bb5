"""Composition results (docs/metrics.md#composition): the modular table, curve and image grid of
one composition, and the continual table's composition rows.

Every value is a mean over the composition's groups and prompts of a per-prompt statistic of
:func:`lorachain.composition.member_summary`: a placeholder's own score ("subject dino": each
subject against its own references), the minimum or the mean over the members one metric scores
("min dino": the worse-kept subject of each prompt), or a text metric on the whole prompt.
"""

from __future__ import annotations

import math
from pathlib import Path

from lorachain import provenance
from lorachain.composition import SEPARATOR, member_summary, read_composition_index, read_composition_scores
from lorachain.metrics.catalog import IMAGE_METRICS, TEXT_METRICS

BASE = "base"


def column_name(statistic: str, metric: str) -> str:
    return metric if metric in TEXT_METRICS else f"{statistic} {metric}"


def _columns(summary, placeholders: list[str]) -> list[tuple[str, str]]:
    """(statistic, metric) of the table's columns: each placeholder's image metrics, the minimum
    and mean where a metric scores two or more members, then the text metrics."""
    present = set(zip(summary["statistic"], summary["metric"]))
    metrics = [metric for metric in (*IMAGE_METRICS, *TEXT_METRICS) if metric in set(summary["metric"])]
    columns = [(p, m) for p in placeholders for m in metrics if m in IMAGE_METRICS and (p, m) in present]
    for metric in (m for m in metrics if m in IMAGE_METRICS):
        if sum((p, metric) in present for p in placeholders) >= 2:
            columns += [("min", metric), ("mean", metric)]
    return columns + [("mean", metric) for metric in metrics if metric in TEXT_METRICS]


def composition_values(summary, columns, groups=None) -> dict[tuple[int, str], float]:
    """{(k, column name): mean over groups and prompts} of one model's summary of one composition
    (over `groups` only, when given)."""
    part = summary if groups is None else summary[summary["group"].isin(groups)]
    means = part.groupby(["after_task", "statistic", "metric"])["score"].mean()
    return {
        (int(k), column_name(statistic, metric)): float(means[(k, statistic, metric)])
        for k in sorted(set(part["after_task"]))
        for statistic, metric in columns
        if (k, statistic, metric) in means.index
    }


def modular_composition_table(scores: dict, base_scores, composition: str, merge_order: list[str]):
    """(table, by-k points), rows base then the merges in `merge_order`. The table holds every
    group at the largest k; the points hold, at every k, the groups that the smallest k already
    holds, so a curve against k follows the same groups."""
    import pandas as pd

    def of_composition(path):
        summary = member_summary(read_composition_scores(path))
        return summary[summary["composition"] == composition]

    summaries = {BASE: of_composition(base_scores), **{label: of_composition(scores[label]) for label in merge_order}}
    merged = pd.concat([summaries[label] for label in merge_order], ignore_index=True)
    if merged.empty:
        raise ValueError(f"composition {composition!r}: no scores in {sorted(scores.values())}; was it sampled?")
    every = pd.concat([summaries[BASE], merged], ignore_index=True)
    placeholders = list(dict.fromkeys(s for s in every["statistic"] if s not in ("min", "mean")))
    columns = _columns(every, placeholders)
    names = [column_name(s, m) for s, m in columns]
    largest, smallest = int(merged["after_task"].max()), int(merged["after_task"].min())
    followed = sorted(set(merged.loc[merged["after_task"] == smallest, "group"]))
    points, rows = [], []
    for label, summary in summaries.items():
        values = composition_values(summary, columns, followed)
        points += [{"merge": label, "k": k, "column": name, "score": v} for (k, name), v in sorted(values.items())]
        at_largest = composition_values(summary, columns)
        k = 0 if label == BASE else largest
        rows.append({"merge": label, "k": k, **{name: at_largest.get((k, name), math.nan) for name in names}})
    points = pd.DataFrame(points, columns=["merge", "k", "column", "score"])
    return pd.DataFrame(rows, columns=["merge", "k", *names]), points


def markdown(table, domain: str, composition: str) -> str:
    header = list(table.columns)
    lines = [
        f"# {domain}: composition {composition!r} at k = {int(table['k'].max())}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in table.itertuples(index=False):
        cells = [str(value) if isinstance(value, str) or i < 2 else _cell(value) for i, value in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "- `<placeholder> <metric>`: each member of that placeholder against its own references",
        "- `min` / `mean <metric>`: per prompt, the worst / mean member that metric scores, then averaged",
        "- text metrics read the whole prompt (clip_score: CLIPScore with class words for rare tokens)",
        "- base: the base model on the same prompts and noises; every value is a mean over groups and prompts",
        "",
    ]
    return "\n".join(lines)


def _cell(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def plot_composition(table, points, composition: str, stem) -> list[Path]:
    """Left: each column at the largest k per merge (bars); right: the first min column (the
    worse-kept member) or else the first column against k, one line per merge, the base dashed."""
    from lorachain.report.figures import _pyplot, _save

    plt = _pyplot()
    names = [name for name in table.columns if name not in ("merge", "k")]
    figure, (bars, curve) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        bars.bar([x + i * width for x in range(len(table))], table[name], width=width, label=name)
    bars.set_xticks([x + 0.4 - width / 2 for x in range(len(table))], table["merge"], rotation=45, ha="right")
    bars.set_title(f"{composition}: at k = {int(table['k'].max())}", fontsize=9)
    bars.legend(fontsize=7)
    shown = next((name for name in names if name.startswith("min ")), names[0])
    for merge, part in points[points["column"] == shown].groupby("merge", sort=False):
        if merge == BASE:
            curve.axhline(float(part["score"].mean()), color="grey", linestyle="--", label=BASE)
        else:
            curve.plot(part["k"], part["score"], marker="o", label=merge)
    curve.set_xlabel("k (concepts merged)")
    curve.set_ylabel(shown)
    curve.set_title(f"{composition}: {shown} against k", fontsize=9)
    curve.legend(fontsize=7)
    paths = _save(figure, stem)
    plt.close(figure)
    return paths


def composition_grid(samples: dict, title: str, path) -> Path:
    """One block per model (base first): rows = the first placeholder's concepts, columns = the
    second's; every cell the first prompt and the first noise (the paired design)."""
    from PIL import Image

    from lorachain.report.figures import _pyplot, _save

    plt = _pyplot()
    frames = {label: read_composition_index(directory) for label, directory in samples.items()}
    frames = {label: frame[(frame["prompt_index"] == 0) & (frame["sample"] == 0)] for label, frame in frames.items()}
    first = next(frame for frame in frames.values() if not frame.empty)
    cells = [concepts.split(SEPARATOR)[:2] for concepts in first["concepts"]]
    rows, columns = list(dict.fromkeys(c[0] for c in cells)), list(dict.fromkeys(c[1] for c in cells))
    figure = plt.figure(figsize=(1.4 * len(columns) * len(frames) + 1, 1.4 * len(rows) + 1), constrained_layout=True)
    blocks = figure.subfigures(1, len(frames), squeeze=False)[0]
    for block, (label, frame) in zip(blocks, frames.items()):
        block.suptitle(label, fontsize=8)
        axes = block.subplots(len(rows), len(columns), squeeze=False)
        images = {tuple(c.split(SEPARATOR)[:2]): p for c, p in zip(frame["concepts"], frame["path"])}
        for r, row in enumerate(rows):
            for c, column in enumerate(columns):
                axis = axes[r][c]
                axis.set_xticks([])
                axis.set_yticks([])
                if (row, column) in images:
                    with Image.open(images[(row, column)]) as image:
                        axis.imshow(image.convert("RGB"))
                if r == 0:
                    axis.set_title(column, fontsize=6)
                if c == 0:
                    axis.set_ylabel(row, fontsize=6)
    figure.suptitle(title, fontsize=9)
    (written,) = _save(figure, Path(path).with_suffix(""), formats=("png",))
    plt.close(figure)
    return written


def modular_composition_job(
    *, domain, composition, scores: dict, base_scores, samples: dict, base_samples, merge_order: list, table,
    markdown_table, points, figure, figure_pdf, grid, model=None,
) -> list[dict]:  # fmt: skip
    """The modular_composition job: one composition of a modular set over every merge."""
    frame, by_k = modular_composition_table(scores, base_scores, composition, merge_order)
    for path in (table, markdown_table, points):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(markdown_table).write_text(markdown(frame, domain, composition))
    plot_composition(frame, by_k, composition, Path(figure).with_suffix(""))
    with_base = {BASE: base_samples, **{label: samples[label] for label in merge_order}}
    composition_grid(with_base, f"{domain}: {composition} (prompt 0, noise 0)", grid)
    provenance.add_columns(frame, model)  # after the Markdown and the figure, which show scores only
    frame.to_csv(table, index=False, float_format="%.6f")
    by_k.to_csv(points, index=False, float_format="%.6f")
    return frame.to_dict(orient="records")


# ------------------------------------------------------------------------------ continual regime


def continual_composition_rows(run_scores: dict, base_scores, methods: list, runs: list, num_tasks: int):
    """The continual table's composition rows, one per (method, composition, statistic, metric),
    with the table's columns: per group, P is its score right after the task that completes it
    (the later of its members), S its score after task T, F = P - S; each averaged over groups and
    prompts, then mean and std over runs. F_ref is not defined for a composition (n/a)."""
    import numpy as np
    import pandas as pd

    summaries = {key: member_summary(read_composition_scores(path)) for key, path in run_scores.items()}
    base = member_summary(read_composition_scores(base_scores)) if base_scores else None
    rows = []
    for method in methods:
        per_run = [_run_values(summaries[f"{method}|{order}|{seed}"], num_tasks) for order, seed in runs]
        for name in sorted(set().union(*per_run)):
            values = {summary: np.array([run[name][summary] for run in per_run if name in run]) for summary in "SFP"}
            row = {"method": method, "metric": name, "n_runs": len(values["S"])}
            for summary in "SFP":
                row[f"{summary}_mean"], row[f"{summary}_std"] = (
                    float(values[summary].mean()),
                    float(values[summary].std()),
                )
            row["F_ref_mean"] = row["F_ref_std"] = math.nan
            row["base"] = _base_value(base, name)
            rows.append(row)
    return pd.DataFrame(rows)


def _label(composition: str, statistic: str, metric: str) -> str:
    return f"{composition}: {column_name(statistic, metric)}"


def _run_values(summary, num_tasks: int) -> dict[str, dict[str, float]]:
    """{row label: {S, F, P}} of one run's composition summary."""
    result = {}
    if summary.empty:
        return result
    summary = summary.assign(last=[max(int(p) for p in g.split(SEPARATOR)) for g in summary["group"]])
    for (composition, statistic, metric), part in summary.groupby(["composition", "statistic", "metric"]):
        if statistic not in ("min", "mean") or (metric in TEXT_METRICS and statistic != "mean"):
            continue  # a composition's own metric: the worst and the mean member, and the text metrics
        learned = part[part["after_task"] == part["last"]].groupby("group")["score"].mean()
        final = part[part["after_task"] == num_tasks].groupby("group")["score"].mean()
        groups = sorted(set(learned.index) & set(final.index))
        if groups:
            P, S = float(learned[groups].mean()), float(final[groups].mean())
            result[_label(composition, statistic, metric)] = {"S": S, "F": P - S, "P": P}
    return result


def _base_value(base, name: str) -> float:
    if base is None or base.empty:
        return math.nan
    labels = [_label(c, s, m) for c, s, m in zip(base["composition"], base["statistic"], base["metric"])]
    part = base[[label == name for label in labels]]
    return float(part["score"].mean()) if not part.empty else math.nan
