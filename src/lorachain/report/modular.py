"""Results of the modular regime: BlockLoRA's Table 1 and Figure 5, and the LoRA diagnostics
(its Figure 4) as workflow jobs.

* Image alignment is the first of CLIP-I, DINO, CSD that the domain is scored with (so DINO for
  the default style metrics; the table's ``image_metric`` and ``image_pairing`` columns say which
  encoder and pairing). Text alignment comes in both conventions, labelled: CLIP-T (raw cosine,
  ``text_alignment``) and CLIPScore (``text_clipscore``, BlockLoRA's Table 1 scale). Each is the
  mean over the k merged concepts of each concept's mean score (so every concept weighs the same).
  ``average`` is the mean of image alignment and CLIP-T (both raw cosines); ``average_clipscore``
  the mean of image alignment and CLIPScore, which is how the paper's Avg column mixes its scales.
* Prior drift (the domain's prior-drift metric) is reported beside them, per merge and per k.
* A mixed concept set (``modular.mixes``) scores each concept with its own domain's metrics, so
  each column averages every concept's own metric (CLIP-I for an object, DINO for a style by the
  preference above); the metric columns name them joined by '/'.
* ``modular.ablation`` lists merge labels to lay out as BlockLoRA's Table 3 (its own table).
* The table reports the largest k merged (the paper: all 15 concepts); the curve shows image
  alignment for every k of the config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lorachain import provenance
from lorachain.metrics.catalog import PRIOR_METRICS
from lorachain.report import figures

IMAGE_METRIC_PREFERENCE = ("clip_i", "dino", "csd")
IMAGE_PAIRING = "all pairs (generated x reference images)"
TABLE_COLUMNS = (
    "domain",
    "merge",
    "merge_type",
    "method",
    "adapters",
    "adapter_params",
    "merge_params",
    "k",
    "merge_s",
    "record_s",
    "merge_with_recording_s",
    "image_metric",
    "image_pairing",
    "image_alignment",
    "text_alignment",
    "text_clipscore",
    "average",
    "average_clipscore",
    "prior_metric",
    "prior_drift",
)
# The columns of each by-k point (the curves) and the metric each is the mean of.
ALIGNMENTS = ("image_alignment", "text_alignment", "text_clipscore", "prior_drift")


class ModularResultError(ValueError):
    """Scores or merge records that do not fit together; names the file."""


def alignment_metrics(metrics: list[str]) -> dict[str, str | None]:
    """Which scored metric fills each alignment column: image (the first of CLIP-I, DINO, CSD), text
    in both conventions (CLIP-T raw cosine, CLIPScore) and prior drift (the first prior metric)."""
    image = next((name for name in IMAGE_METRIC_PREFERENCE if name in metrics), None)
    if image is None:
        raise ModularResultError(
            f"the domain's metrics {metrics} have no image metric ({', '.join(IMAGE_METRIC_PREFERENCE)})"
        )
    return {
        "image_alignment": image,
        "text_alignment": "clip_t" if "clip_t" in metrics else None,
        "text_clipscore": "clip_score" if "clip_score" in metrics else None,
        "prior_drift": next((name for name in PRIOR_METRICS if name in metrics), None),
    }


def column_metrics(metrics: list | dict, size: int) -> dict[str, dict[int, str] | None]:
    """Column -> (task -> the metric that fills it) for tasks 1..size; a mixed set's metrics are per
    task, so each concept counts with its own kind's metric. None: a task lacks the column's metric."""
    per_task = {
        task: alignment_metrics(metrics[str(task)] if isinstance(metrics, dict) else metrics)
        for task in range(1, size + 1)
    }
    columns = {}
    for column in ALIGNMENTS:
        chosen = {task: names[column] for task, names in per_task.items()}
        columns[column] = None if None in chosen.values() else chosen
    return columns


def metric_label(metric_of: dict[int, str] | None) -> str:
    """The metric names of a column, joined by '/' in task order ('clip_i/dino' for a mixed set)."""
    return "/".join(dict.fromkeys(metric_of.values())) if metric_of else ""


def alignment_by_k(scores, metric_of: dict[int, str], source: str) -> dict[int, float]:
    """k -> mean over the merged concepts 1..k of each one's mean score by its own metric."""
    result = {}
    for k in sorted(int(k) for k in scores["after_task"].unique()):
        at_k = scores[scores["after_task"] == k]
        per_concept = []
        for task in range(1, k + 1):
            rows = at_k[(at_k["task"] == task) & (at_k["metric"] == metric_of[task])]
            if rows.empty:
                raise ModularResultError(
                    f"{source}: the merge of k = {k} has no {metric_of[task]} scores on task {task}, "
                    f"expected tasks 1..{k}"
                )
            per_concept.append(float(rows["score"].mean()))
        result[k] = sum(per_concept) / k
    return result


def _read_record(records: dict, label: str, k: int, domain: str) -> dict:
    record_path = records.get(f"{label}|{k}")
    if record_path is None:
        raise ModularResultError(f"domain {domain}: no merge record for merge {label!r} at k = {k}")
    record = json.loads(Path(record_path).read_text())
    if record.get("k") != k:
        raise ModularResultError(f"{record_path}: records k = {record.get('k')}, expected {k}")
    return record


def _mean_of(first: float, second: float) -> float:
    return (first + second) / 2 if not math.isnan(second) else first


def modular_table(
    *,
    domain: str,
    scores: dict[str, str],
    records: dict[str, str],
    merges: dict[str, dict],
    merge_order: list[str],
    metrics: list[str],
):
    """One row per merge label at its largest k, plus the per-k alignment (long) for the curves."""
    import pandas as pd

    from lorachain.metrics.scoring import read_scores

    rows, curve_rows = [], []
    for label in merge_order:
        if label not in scores:
            raise ModularResultError(f"domain {domain}: no scores given for merge {label!r}")
        frame = read_scores(scores[label])
        columns = column_metrics(metrics, int(frame["after_task"].max()))
        by_k = {
            column: alignment_by_k(frame, metric_of, scores[label]) if metric_of else {}
            for column, metric_of in columns.items()
        }
        ks = sorted(by_k["image_alignment"])
        for k in ks:
            record = _read_record(records, label, k, domain)
            values = {column: by_k[column].get(k, math.nan) for column in ALIGNMENTS}
            timing = {"merge_s": record["merge_s"], "record_s": _seconds(record.get("record_s"))}
            curve_rows.append({"domain": domain, "merge": label, "k": k, **values, **timing})
        point = curve_rows[-1]
        merge = merges[label]
        rows.append(
            {
                "domain": domain,
                "merge": label,
                "merge_type": _read_record(records, label, ks[-1], domain)["merge_type"],
                "method": merge["method"],
                "adapters": merge["adapters"],
                "adapter_params": format_params(merge.get("adapter_method", ""), merge.get("adapter_params", {})),
                "merge_params": format_params("", merge.get("merge_params", {})),
                "k": ks[-1],
                "merge_s": point["merge_s"],
                "record_s": point["record_s"],
                "merge_with_recording_s": point["merge_s"]
                + (0.0 if math.isnan(point["record_s"]) else point["record_s"]),
                "image_metric": metric_label(columns["image_alignment"]),
                "image_pairing": IMAGE_PAIRING,
                **{column: point[column] for column in ALIGNMENTS},
                "average": _mean_of(point["image_alignment"], point["text_alignment"]),
                "average_clipscore": _mean_of(point["image_alignment"], point["text_clipscore"]),
                "prior_metric": metric_label(columns["prior_drift"]),
            }
        )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS)), pd.DataFrame(curve_rows)


def _seconds(value) -> float:
    """A recorded time, NaN where none applies (an instant merge records no layer inputs)."""
    return math.nan if value is None else float(value)


def format_params(method: str, params: dict) -> str:
    """An adapter's method and parameters as one cell: ``blocklora(erasure=0.25, num_blocks=4)``."""
    inner = ", ".join(f"{key}={value}" for key, value in sorted(params.items()))
    return f"{method}({inner})" if method else inner


def _cell(value: float, places: int = 4) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.{places}f}"


def _label(names: str) -> str:
    return "/".join(figures.METRIC_LABELS.get(name, name) for name in names.split("/")) if names else ""


def _header_labels(table) -> tuple[str, str]:
    first = table.iloc[0] if len(table) else {"image_metric": "image", "prior_metric": ""}
    return _label(first["image_metric"]) or "image", _label(first["prior_metric"]) or "prior drift"


ALIGNMENT_HEADERS = (
    "text alignment (CLIP-T, raw cosine)",
    "text alignment (CLIPScore)",
    "average (raw cosines)",
    "average (image cosine, CLIPScore text: the paper's Avg)",
)


def _legend(image_label: str, prior_label: str) -> list[str]:
    return [
        "",
        f"- image alignment: {image_label}, mean cosine over {IMAGE_PAIRING}, "
        "per concept, then the mean over the k merged concepts",
        "- text alignment (CLIP-T): raw cosine of each image with its own prompt, as sampled (rare token included)",
        "- text alignment (CLIPScore, Hessel et al. 2021): 2.5 x max(cos, 0) of each image with "
        '"A photo depicts <prompt>", the class word in place of the rare token: the scale of BlockLoRA\'s Table 1',
        "- average (raw cosines): mean of image alignment and CLIP-T; average (the paper's Avg): mean of image "
        "alignment and CLIPScore, as BlockLoRA's Table 1 averages its columns (two scales)",
        f"- prior drift ({prior_label}): 1 - cosine of each class-prompt image (the concept's class without it, "
        "e.g. 'a photo of dog') with the base model's image from the same noise; 0 = the prior is intact, "
        "lower is better",
        "- merge time: the merge alone (LoRA files already read), on the machine that ran the job; "
        "recording time: the k concepts' layer-input recording jobs (gradient fusion only; n/a for instant "
        "merges); merge + recording: what a merge on recorded inputs costs from trained LoRAs",
        "",
    ]


def _alignment_cells(row) -> list[str]:
    return [
        _cell(row.image_alignment),
        _cell(row.text_alignment),
        _cell(row.text_clipscore),
        _cell(row.average),
        _cell(row.average_clipscore),
        _cell(row.prior_drift),
    ]


def markdown_table(table, domain: str) -> str:
    image_label, prior_label = _header_labels(table)
    header = [
        "merge",
        "merge type",
        "method (adapters)",
        "k",
        "merge time (s)",
        "recording time (s)",
        "merge + recording (s)",
        f"image alignment ({image_label})",
        *ALIGNMENT_HEADERS,
        f"prior drift ({prior_label})",
        "adapters' method and parameters",
        "merge parameters",
    ]
    lines = [
        f"# {domain}: instant merging of independently trained concepts",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in table.itertuples(index=False):
        times = [_cell(seconds, 3) for seconds in (row.merge_s, row.record_s, row.merge_with_recording_s)]
        cells = [row.merge, row.merge_type, f"{row.method} ({row.adapters})", str(row.k), *times]
        lines.append("| " + " | ".join(cells + _alignment_cells(row) + [row.adapter_params, row.merge_params]) + " |")
    return "\n".join(lines + _legend(image_label, prior_label))


def ablation_table(table, rows: list[str], domain: str, source: str):
    """BlockLoRA's Table 3 layout: the merge labels `rows` (config modular.ablation), in that order,
    each with its adapters' parameters, from the modular table `table`. Returns (frame, Markdown)."""
    missing = [label for label in rows if label not in set(table["merge"])]
    if missing:
        raise ModularResultError(f"{source}: no rows for the ablation's merges {missing} (config modular.ablation)")
    frame = table.set_index("merge").loc[rows].reset_index()
    image_label, prior_label = _header_labels(frame)
    header = ["merge", "adapters", "k", f"image alignment ({image_label})", *ALIGNMENT_HEADERS]
    header.append(f"prior drift ({prior_label})")
    lines = [
        f"# {domain}: ablation (BlockLoRA's Table 3 layout)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in frame.itertuples(index=False):
        cells = [row.merge, row.adapter_params, str(row.k)]
        lines.append("| " + " | ".join(cells + _alignment_cells(row)) + " |")
    return frame, "\n".join(lines + _legend(image_label, prior_label))


def plot_curve(curve, column: str, label: str, title: str, stem) -> list[Path]:
    """One line per merge label: `column` of the by-k points against k."""
    plt = figures._pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for merge, group in curve.groupby("merge", sort=False):
        group = group.sort_values("k")
        axis.plot(group["k"], group[column], marker="o", label=merge)
    axis.set_xlabel("number of merged concepts k")
    axis.set_ylabel(label)
    axis.set_title(title)
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.legend(fontsize="small")
    written = figures._save(figure, stem)
    plt.close(figure)
    return written


def _figure_stem(png, pdf) -> Path:
    stem = Path(png).with_suffix("")
    if Path(pdf) != stem.with_suffix(".pdf"):
        raise ModularResultError(f"{png}, {pdf}: a figure's outputs are <stem>.png and <stem>.pdf")
    return stem


def modular_results_job(
    *, domain, scores, records, merges, merge_order, metrics, table, markdown, points, curve, curve_pdf, model=None
) -> list[dict]:
    """The modular_results job: the table (CSV `table`, Markdown `markdown`; merges in
    `merge_order`), every merge's alignment by k (CSV `points`) and the image-alignment curve
    (`curve` PNG and `curve_pdf`: BlockLoRA's Figure 5). Returns the table's rows."""
    stem = _figure_stem(curve, curve_pdf)
    merges = {label: dict(block) for label, block in merges.items()}
    summary, by_k = modular_table(
        domain=domain, scores=scores, records=records, merges=merges, merge_order=merge_order, metrics=metrics
    )
    Path(table).parent.mkdir(parents=True, exist_ok=True)
    by_k.to_csv(points, index=False, float_format="%.6f")
    Path(markdown).write_text(markdown_table(summary, domain))
    image_metric = summary["image_metric"].iloc[0]
    provenance.add_columns(summary, model)  # in the CSV only: the Markdown shows the scores
    summary.to_csv(table, index=False, float_format="%.6f")
    label = f"image alignment ({_label(image_metric)})"
    plot_curve(by_k, "image_alignment", label, f"{domain}: image alignment of merged concepts", stem)
    return summary.to_dict(orient="records")


def modular_prior_drift_job(*, domain, metric: str, points, curve, curve_pdf) -> None:
    """The modular_prior_drift job: prior drift of every merge against k (BlockLoRA's Figure 3
    hypothesis, measured), from the by-k points the modular_results job wrote."""
    import pandas as pd

    by_k = pd.read_csv(points)
    if by_k["prior_drift"].isna().all():
        raise ModularResultError(f"{points}: no prior-drift values; the domain is not scored with {metric}")
    label = f"prior drift ({_label(metric)}; lower is better)"
    plot_curve(by_k, "prior_drift", label, f"{domain}: drift of the class prior", _figure_stem(curve, curve_pdf))


def modular_ablation_job(*, domain, rows: list, table, ablation, markdown) -> list[dict]:
    """The modular_ablation job: the merges `rows` (config modular.ablation) of the modular table
    `table` in BlockLoRA's Table 3 layout (CSV `ablation`, Markdown `markdown`)."""
    import pandas as pd

    frame, text = ablation_table(pd.read_csv(table, keep_default_na=False, na_values=[""]), list(rows), domain, table)
    frame.to_csv(ablation, index=False, float_format="%.6f")
    Path(markdown).write_text(text)
    return frame.to_dict(orient="records")


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
