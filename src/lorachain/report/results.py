"""The report jobs: continual tables, per-metric figures and image grids of one domain."""

from __future__ import annotations

from pathlib import Path

from lorachain import continual, provenance
from lorachain.report import figures


def _run_key(text: str) -> tuple[str, int, int]:
    method, order, seed = text.split("|")
    return method, int(order), int(seed)


def continual_table_job(
    *,
    domain: str,
    run_scores: dict[str, str],
    base_scores: str,
    methods: list[str],
    metrics: list[str],
    num_tasks: int,
    orders: list[int],
    seeds: list[int],
    table,
    markdown,
    matrices,
    run_composition_scores: dict | None = None,
    base_composition_scores: list | None = None,
    model: str | None = None,
) -> list[dict]:
    """The continual_table job: check that every (method, order, seed) run has a complete matrix,
    write the long matrix file `matrices` and the summary table (CSV `table`, Markdown `markdown`;
    rows in the order of `methods`). A domain with compositions adds their rows (the composition
    metric: :func:`lorachain.report.composition.continual_composition_rows`). The table ends with the
    provenance columns (:data:`lorachain.provenance.COLUMNS`; `model`: the base model's source).
    Returns the table's rows."""
    from lorachain.metrics.scoring import read_scores

    expected = {(method, order, seed) for method in methods for order in orders for seed in seeds}
    given = {_run_key(key): path for key, path in run_scores.items()}
    missing = sorted(expected - set(given))
    if missing:
        raise continual.SummaryError(f"domain {domain}: no scores given for runs {missing}")
    loaded = {key: (read_scores(path), str(path)) for key, path in given.items()}
    matrix_frame = continual.matrix_frame(loaded, metrics, num_tasks)
    base = read_scores(base_scores)
    runs = [(order, seed) for order in orders for seed in seeds]
    summary = continual.summary_table(matrix_frame, base, methods, metrics, num_tasks, runs)
    if run_composition_scores:
        import pandas as pd

        from lorachain.report.composition import continual_composition_rows

        base_composed = (base_composition_scores or [None])[0]
        composed = continual_composition_rows(run_composition_scores, base_composed, methods, runs, num_tasks)
        summary = pd.concat([summary, composed[summary.columns]], ignore_index=True)
    summary.insert(0, "domain", domain)
    for path in (table, markdown, matrices):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    matrix_frame.to_csv(matrices, index=False, float_format="%.6f")
    Path(markdown).write_text(
        continual.markdown_table(
            summary, f"{domain}: continual summary over {len(runs)} run(s) per method, T = {num_tasks}"
        )
    )
    provenance.add_columns(summary, model)  # in the CSV only: the Markdown shows the scores
    summary.to_csv(table, index=False, float_format="%.6f")
    return summary.to_dict(orient="records")


def _stem(png, pdf) -> Path:
    """The common stem of a figure's PNG and PDF outputs (figures are written as both)."""
    stem = Path(png).with_suffix("")
    if Path(png) != stem.with_suffix(".png") or Path(pdf) != stem.with_suffix(".pdf"):
        raise ValueError(f"{png}, {pdf}: a figure's outputs are <stem>.png and <stem>.pdf")
    return stem


def plot_metric_job(
    *,
    domain: str,
    metric: str,
    matrices,
    base_scores,
    methods: list[str],
    num_tasks: int,
    heatmap,
    heatmap_pdf,
    curve,
    curve_pdf,
):
    """The plot_metric job: heatmaps of a[j, i] per method (in the order of `methods`) and the first
    task's curve of one metric, each as PNG and PDF."""
    import pandas as pd

    from lorachain.metrics.scoring import read_scores

    heatmap_stem, curve_stem = _stem(heatmap, heatmap_pdf), _stem(curve, curve_pdf)
    frame = pd.read_csv(matrices)
    frame = frame[frame["method"].isin(methods)]
    base = read_scores(base_scores)
    label = figures.METRIC_LABELS.get(metric, metric)
    mean = continual.mean_matrices(frame, metric, num_tasks)
    missing = [method for method in methods if method not in mean]
    if missing:
        raise continual.SummaryError(f"{matrices}: no {metric} scores for methods {missing}")
    runs = frame.drop_duplicates(["method", "order", "seed"]).groupby("method").size().max()
    figures.heatmaps(
        {method: mean[method] for method in methods},
        metric,
        f"{domain}: {label}, mean over {runs} run(s)",
        heatmap_stem,
    )
    curves, base_line = continual.first_task_curves(frame, base, metric)
    figures.first_task_curves(
        {method: curves[method] for method in methods}, base_line, metric, f"{domain}: first task's {label}", curve_stem
    )


def image_grid_job(
    *, domain: str, samples: dict[str, str], methods: list[str], base_samples, grid: dict, run: dict, output
):
    """The image_grid job: the first task's image for one prompt and noise (``report.grid``), per
    method (rows, in the order of `methods`) after each task (columns). `samples` maps
    "<method>|<after task>" to a sample directory."""
    from lorachain.sample import SamplingError, read_index

    prompt_index, sample = grid["prompt_index"], grid["sample"]
    samples = {key: value for method in methods for key, value in samples.items() if key.split("|")[0] == method}

    def pick(frame, source):
        chosen = frame[(frame["task"] == 1) & (frame["prompt_index"] == prompt_index) & (frame["sample"] == sample)]
        if len(chosen) != 1:
            raise SamplingError(
                f"{source}: no image for task 1, prompt {prompt_index}, sample {sample} (config report.grid)"
            )
        return chosen.iloc[0]

    rows: dict[str, dict[int, str]] = {}
    first = None
    for key, directory in samples.items():
        method, after = key.split("|")
        chosen = pick(read_index(directory), directory)
        rows.setdefault(method, {})[int(after)] = chosen["path"]
        first = chosen
    base = read_index(base_samples)
    base_image = base[
        (base["concept"] == first["concept"]) & (base["prompt_index"] == prompt_index) & (base["sample"] == sample)
    ]
    if len(base_image) != 1:
        raise SamplingError(
            f"{base_samples}: no base image of {first['concept']}, prompt {prompt_index}, sample {sample}"
        )
    title = f'{domain}, order {run["order"]}, seed {run["seed"]}: "{first["prompt"]}" (noise {sample})'
    return figures.image_grid(rows, base_image.iloc[0]["path"], title, output)
