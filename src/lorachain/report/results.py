"""The report jobs: continual tables, per-metric figures and image grids of one domain."""

from __future__ import annotations

from pathlib import Path

from lorachain import continual
from lorachain.report import figures


def _run_key(text: str) -> tuple[str, int, int]:
    method, order, seed = text.split("|")
    return method, int(order), int(seed)


def continual_table_job(*, domain: str, run_scores: dict[str, str], base_scores: str, methods: list[str], metrics: list[str],
                        num_tasks: int, orders: list[int], seeds: list[int], table_csv, table_md, matrices_csv):
    """Check that every (method, order, seed) run has a complete matrix, write the long matrix
    file and the summary table (CSV and Markdown)."""
    from lorachain.metrics.scoring import read_scores

    expected = {(method, order, seed) for method in methods for order in orders for seed in seeds}
    given = {_run_key(key): path for key, path in run_scores.items()}
    missing = sorted(expected - set(given))
    if missing:
        raise continual.SummaryError(f"domain {domain}: no scores given for runs {missing}")
    loaded = {key: (read_scores(path), str(path)) for key, path in given.items()}
    matrices = continual.matrix_frame(loaded, metrics, num_tasks)
    base = read_scores(base_scores)
    runs = [(order, seed) for order in orders for seed in seeds]
    table = continual.summary_table(matrices, base, methods, metrics, num_tasks, runs)
    table.insert(0, "domain", domain)
    for path in (table_csv, table_md, matrices_csv):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    matrices.to_csv(matrices_csv, index=False, float_format="%.6f")
    table.to_csv(table_csv, index=False, float_format="%.6f")
    Path(table_md).write_text(continual.markdown_table(table, f"{domain}: continual summary over {len(runs)} run(s) per method, T = {num_tasks}"))
    return table


def plot_metric_job(*, domain: str, metric: str, matrices_csv, base_scores, methods: list[str], num_tasks: int, heatmap_stem, curve_stem):
    import pandas as pd

    from lorachain.metrics.scoring import read_scores

    matrices = pd.read_csv(matrices_csv)
    matrices = matrices[matrices["method"].isin(methods)]
    base = read_scores(base_scores)
    label = figures.METRIC_LABELS.get(metric, metric)
    mean = continual.mean_matrices(matrices, metric, num_tasks)
    missing = [method for method in methods if method not in mean]
    if missing:
        raise continual.SummaryError(f"{matrices_csv}: no {metric} scores for methods {missing}")
    runs = matrices.drop_duplicates(["method", "order", "seed"]).groupby("method").size().max()
    figures.heatmaps({method: mean[method] for method in methods}, metric, f"{domain}: {label}, mean over {runs} run(s)", heatmap_stem)
    curves, base_line = continual.first_task_curves(matrices, base, metric)
    figures.first_task_curves({method: curves[method] for method in methods}, base_line, metric, f"{domain}: first task's {label}", curve_stem)


def image_grid_job(*, domain: str, samples: dict[str, str], base_samples, prompt_index: int, sample: int, run: dict, output):
    """The first task's image for one prompt and noise, per method (rows) after each task (columns)."""
    from lorachain.sample import SamplingError, read_index

    def pick(frame, source):
        chosen = frame[(frame["task"] == 1) & (frame["prompt_index"] == prompt_index) & (frame["sample"] == sample)]
        if len(chosen) != 1:
            raise SamplingError(f"{source}: no image for task 1, prompt {prompt_index}, sample {sample} (config report.grid)")
        return chosen.iloc[0]

    rows: dict[str, dict[int, str]] = {}
    first = None
    for key, directory in samples.items():
        method, after = key.split("|")
        chosen = pick(read_index(directory), directory)
        rows.setdefault(method, {})[int(after)] = chosen["path"]
        first = chosen
    base = read_index(base_samples)
    base_image = base[(base["concept"] == first["concept"]) & (base["prompt_index"] == prompt_index) & (base["sample"] == sample)]
    if len(base_image) != 1:
        raise SamplingError(f"{base_samples}: no base image of {first['concept']}, prompt {prompt_index}, sample {sample}")
    title = f"{domain}, order {run['order']}, seed {run['seed']}: \"{first['prompt']}\" (noise {sample})"
    return figures.image_grid(rows, base_image.iloc[0]["path"], title, output)
