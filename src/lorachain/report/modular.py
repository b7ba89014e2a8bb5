"""Results of the modular regime: BlockLoRA's Table 1 and Figure 5, and the LoRA diagnostics
(its Figure 4) as workflow jobs.

* Image alignment is the first of CLIP-I, DINO, CSD that the domain is scored with (so DINO for
  the default style metrics; the table's ``image_metric`` column names it); text alignment is
  CLIP-T. Both are the mean over the k merged concepts of each concept's mean score (so every
  concept weighs the same), "average" is their mean.
* The table reports the largest k merged (the paper: all 15 concepts); the curve shows image
  alignment for every k of the config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lorachain.report import figures

IMAGE_METRIC_PREFERENCE = ("clip_i", "dino", "csd")
TABLE_COLUMNS = (
    "domain",
    "merge",
    "merge_type",
    "method",
    "adapters",
    "k",
    "merge_s",
    "image_metric",
    "image_alignment",
    "text_alignment",
    "average",
)


class ModularResultError(ValueError):
    """Scores or merge records that do not fit together; names the file."""


def alignment_metrics(metrics: list[str]) -> tuple[str, str | None]:
    image = next((name for name in IMAGE_METRIC_PREFERENCE if name in metrics), None)
    if image is None:
        raise ModularResultError(
            f"the domain's metrics {metrics} have no image metric ({', '.join(IMAGE_METRIC_PREFERENCE)})"
        )
    return image, "clip_t" if "clip_t" in metrics else None


def alignment_by_k(scores, metric: str, source: str) -> dict[int, float]:
    """k -> mean over the merged concepts of their mean `metric` score."""
    part = scores[scores["metric"] == metric]
    if part.empty:
        raise ModularResultError(f"{source}: no {metric} scores")
    result = {}
    for k, group in part.groupby("after_task"):
        per_concept = group.groupby("task")["score"].mean()
        if sorted(per_concept.index) != list(range(1, int(k) + 1)):
            raise ModularResultError(
                f"{source}: the merge of k = {k} is scored on tasks {sorted(per_concept.index)}, expected 1..{k}"
            )
        result[int(k)] = float(per_concept.mean())
    return result


def modular_table(
    *,
    domain: str,
    scores: dict[str, str],
    records: dict[str, str],
    merges: dict[str, dict],
    merge_order: list[str],
    metrics: list[str],
):
    """One row per merge label at its largest k, plus the per-k alignment (long) for the curve."""
    import pandas as pd

    from lorachain.metrics.scoring import read_scores

    image_metric, text_metric = alignment_metrics(metrics)
    rows, curve_rows = [], []
    for label in merge_order:
        if label not in scores:
            raise ModularResultError(f"domain {domain}: no scores given for merge {label!r}")
        frame = read_scores(scores[label])
        image = alignment_by_k(frame, image_metric, scores[label])
        text = alignment_by_k(frame, text_metric, scores[label]) if text_metric else {}
        ks = sorted(image)
        for k in ks:
            record_path = records.get(f"{label}|{k}")
            if record_path is None:
                raise ModularResultError(f"domain {domain}: no merge record for merge {label!r} at k = {k}")
            record = json.loads(Path(record_path).read_text())
            if record.get("k") != k:
                raise ModularResultError(f"{record_path}: records k = {record.get('k')}, expected {k}")
            curve_rows.append(
                {
                    "domain": domain,
                    "merge": label,
                    "k": k,
                    "image_alignment": image[k],
                    "text_alignment": text.get(k, math.nan),
                    "merge_s": record["merge_s"],
                }
            )
        largest = ks[-1]
        record = json.loads(Path(records[f"{label}|{largest}"]).read_text())
        text_value = text.get(largest, math.nan)
        rows.append(
            {
                "domain": domain,
                "merge": label,
                "merge_type": record["merge_type"],
                "method": merges[label]["method"],
                "adapters": merges[label]["adapters"],
                "k": largest,
                "merge_s": record["merge_s"],
                "image_metric": image_metric,
                "image_alignment": image[largest],
                "text_alignment": text_value,
                "average": (image[largest] + text_value) / 2 if text_metric else image[largest],
            }
        )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), pd.DataFrame(curve_rows)


def markdown_table(table, domain: str) -> str:
    label = (
        figures.METRIC_LABELS.get(table["image_metric"].iloc[0], table["image_metric"].iloc[0])
        if len(table)
        else "image"
    )
    header = [
        "merge",
        "merge type",
        "method (adapters)",
        "k",
        "merge time (s)",
        f"image alignment ({label})",
        "text alignment (CLIP-T)",
        "average",
    ]
    lines = [
        f"# {domain}: instant merging of independently trained concepts",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in table.itertuples(index=False):
        lines.append(
            "| "
            + " | ".join(
                [
                    row.merge,
                    row.merge_type,
                    f"{row.method} ({row.adapters})",
                    str(row.k),
                    f"{row.merge_s:.3f}",
                    f"{row.image_alignment:.4f}",
                    "n/a" if math.isnan(row.text_alignment) else f"{row.text_alignment:.4f}",
                    f"{row.average:.4f}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "- alignment: mean over the k merged concepts of each concept's mean cosine similarity",
        "- merge time: the merge alone (LoRA files already read), on the machine that ran the job",
        "",
    ]
    return "\n".join(lines)


def plot_curve(curve, image_metric: str, title: str, stem) -> list[Path]:
    plt = figures._pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, group in curve.groupby("merge", sort=False):
        group = group.sort_values("k")
        axis.plot(group["k"], group["image_alignment"], marker="o", label=label)
    axis.set_xlabel("number of merged concepts k")
    axis.set_ylabel(f"image alignment ({figures.METRIC_LABELS.get(image_metric, image_metric)})")
    axis.set_title(title)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.legend(fontsize="small")
    written = figures._save(figure, stem)
    plt.close(figure)
    return written


def modular_results_job(
    *, domain, scores, records, merges, merge_order, metrics, table, markdown, curve, curve_pdf
) -> list[dict]:
    """The modular_results job: the table (CSV `table`, Markdown `markdown`; merges in
    `merge_order`) and the curve (`curve` PNG and `curve_pdf`). Returns the table's rows."""
    stem = Path(curve).with_suffix("")
    if Path(curve_pdf) != stem.with_suffix(".pdf"):
        raise ModularResultError(f"{curve}, {curve_pdf}: the curve's outputs are <stem>.png and <stem>.pdf")
    merges = {label: dict(block) for label, block in merges.items()}
    summary, points = modular_table(
        domain=domain, scores=scores, records=records, merges=merges, merge_order=merge_order, metrics=metrics
    )
    Path(table).parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(table, index=False, float_format="%.6f")
    Path(markdown).write_text(markdown_table(summary, domain))
    plot_curve(points, summary["image_metric"].iloc[0], f"{domain}: image alignment of merged concepts", stem)
    return summary.to_dict(orient="records")


def lora_diagnostics_job(*, loras: list, cosine, conflicts, cosine_figure, conflicts_figure) -> None:
    """The lora_diagnostics job: layer-wise pairwise cosine similarity and sign conflicts of the
    concepts' LoRA files `loras` (named "concept 1" .. in their order), as CSV and figures."""
    diagnostics(
        lora_files=list(loras),
        names=[f"concept {index}" for index in range(1, len(loras) + 1)],
        cosine_csv=cosine,
        conflicts_csv=conflicts,
        cosine_png=cosine_figure,
        conflicts_png=conflicts_figure,
    )


def diagnostics(*, lora_files: list, names: list[str], cosine_csv, conflicts_csv, cosine_png, conflicts_png):
    """Layer-wise pairwise cosine similarity and sign conflicts of a set of LoRA files."""
    from lorachain.lora import read_lora
    from lorachain.merging.diagnostics import cosine_tables, plot_cosine_heatmap, plot_sign_conflicts, sign_conflicts

    loras = [read_lora(path) for path in lora_files]
    cosine, _ = cosine_tables(loras, names)
    conflicts = sign_conflicts(loras, names)
    Path(cosine_csv).parent.mkdir(parents=True, exist_ok=True)
    cosine.to_csv(cosine_csv, float_format="%.6f")
    conflicts.to_csv(conflicts_csv, index=False, float_format="%.6f")
    plot_cosine_heatmap(cosine, cosine_png)
    plot_sign_conflicts(conflicts, conflicts_png)
