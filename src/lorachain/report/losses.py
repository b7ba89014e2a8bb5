"""Training-loss curves of a domain's runs, from the tasks' ``loss.csv`` files (one figure per
domain: one panel per method, one line per run over its whole chain of tasks)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lorachain.report.figures import _pyplot, _save


class LossLogError(ValueError):
    """A loss.csv that cannot be plotted; the message names the file."""


def read_loss_log(path: str | Path) -> np.ndarray:
    """The losses of a task's loss.csv (columns step, loss; steps 0, 1, ... in order)."""
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != ["step", "loss"]:
            raise LossLogError(f"{path}: expected the columns step,loss, found {reader.fieldnames}; retrain the task")
        rows = list(reader)
    steps = [int(row["step"]) for row in rows]
    if steps != list(range(len(rows))):
        raise LossLogError(f"{path}: steps are not 0, 1, ..., {len(rows) - 1}; the file is damaged, retrain the task")
    return np.array([float(row["loss"]) for row in rows])


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and up to `window - 1` before it (no values invented at the start)."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    counts = np.minimum(ends, window)
    return (sums[ends] - sums[ends - counts]) / counts


def chain_losses(logs: dict[int, str | Path]) -> tuple[np.ndarray, list[int]]:
    """One run's losses over its chain (task 1's steps, then task 2's, ...) and the step at which
    each task after the first starts."""
    parts = [read_loss_log(logs[task]) for task in sorted(logs)]
    starts = np.cumsum([len(part) for part in parts])[:-1].tolist()
    return np.concatenate(parts), starts


def loss_curves(runs: dict[str, dict[str, dict[int, str | Path]]], title: str, stem: str | Path) -> list[Path]:
    """One panel per method (in `runs`' order), one line per run (label -> task -> loss.csv): the
    loss smoothed over about a twentieth of a task, raw values faint behind it, dotted lines where a
    new task starts."""
    plt = _pyplot()
    figure, axes = plt.subplots(
        1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False, sharey=True, constrained_layout=True
    )
    for axis, (method, by_run) in zip(axes[0], runs.items()):
        for label, logs in by_run.items():
            losses, starts = chain_losses(logs)
            window = max(1, len(losses) // (20 * len(logs)))
            (line,) = axis.plot(running_mean(losses, window), linewidth=1.2, label=label)
            axis.plot(losses, color=line.get_color(), alpha=0.15, linewidth=0.6)
        for start in starts:
            axis.axvline(start, color="grey", linestyle=":", linewidth=0.8)
        axis.set_title(method)
        axis.set_xlabel("training step over the chain of tasks")
        axis.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("training loss")
    figure.suptitle(title)
    paths = _save(figure, stem)
    plt.close(figure)
    return paths


def runs_by_method(loss_logs: dict[str, str], methods: list[str]) -> dict[str, dict[str, dict[int, str]]]:
    """``"method|order|seed|task" -> loss.csv`` (the rule's params) as method -> run label -> task
    -> loss.csv, methods in `methods`' order."""
    runs: dict[str, dict[str, dict[int, str]]] = {method: {} for method in methods}
    for key, path in loss_logs.items():
        method, order, seed, task = key.split("|")
        runs[method].setdefault(f"order {order}, seed {seed}", {})[int(task)] = path
    return {method: dict(sorted(by_run.items())) for method, by_run in runs.items() if by_run}


def loss_curves_job(*, loss_logs: dict, methods: list, domain: str, png, pdf) -> dict:
    """The loss_curves job: the training-loss figure of one domain (PNG and PDF)."""
    if Path(png).with_suffix(".pdf") != Path(pdf):
        raise LossLogError(f"{png}, {pdf}: the loss figure's PNG and PDF must share their name")
    runs = runs_by_method(loss_logs, list(methods))
    paths = loss_curves(runs, f"{domain}: training loss", Path(png).with_suffix(""))
    return {"figures": [str(path) for path in paths], "runs": sum(len(by_run) for by_run in runs.values())}
