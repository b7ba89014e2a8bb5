"""Figures of the continual results: heatmaps of a[j, i], first-task curves, image grids.

All figures are matplotlib (Agg backend, no display needed). Heatmaps and curves are
sequence-aligned (row j = the j-th task each run learned), see lorachain.continual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRIC_LABELS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "clip_score": "CLIPScore",
    "csd": "CSD",
    "prior_drift_dino": "prior drift, DINO",
    "prior_drift_clip": "prior drift, CLIP",
    "prior_drift_csd": "prior drift, CSD",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, stem: str | Path, formats=("png", "pdf")) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in formats:
        path = stem.with_suffix(f".{suffix}")
        # A fixed creation date keeps PDFs byte-identical across reruns of the same numbers.
        metadata = {"CreationDate": None} if suffix == "pdf" else {"Software": None}
        figure.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
        written.append(path)
    return written


def heatmaps(mean_by_method: dict[str, np.ndarray], metric: str, title: str, stem: str | Path) -> list[Path]:
    """One panel per method: a[j, i] averaged over runs, on one colour scale."""
    plt = _pyplot()
    methods = list(mean_by_method)
    values = np.concatenate([a[np.isfinite(a)] for a in mean_by_method.values()])
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-9:
        low, high = low - 1e-3, high + 1e-3
    T = next(iter(mean_by_method.values())).shape[0]
    size = max(2.6, 0.45 * T + 1.2)
    figure, axes = plt.subplots(
        1, len(methods), figsize=(size * len(methods), size + 0.4), squeeze=False, constrained_layout=True
    )
    for axis, method in zip(axes[0], methods):
        a = mean_by_method[method]
        image = axis.imshow(np.ma.masked_invalid(a), vmin=low, vmax=high, cmap="viridis", origin="upper")
        if T <= 12:
            for (j, i), value in np.ndenumerate(a):
                if np.isfinite(value):
                    axis.text(
                        i,
                        j,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value < (low + high) / 2 else "black",
                    )
        axis.set_title(method)
        axis.set_xticks(range(T), [str(i + 1) for i in range(T)])
        axis.set_yticks(range(T), [str(j + 1) for j in range(T)])
        axis.set_xlabel("after training task i")
        axis.set_ylabel("evaluated on task j")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=METRIC_LABELS.get(metric, metric))
    figure.suptitle(title)
    paths = _save(figure, stem)
    plt.close(figure)
    return paths


def first_task_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], base: float, metric: str, title: str, stem: str | Path
) -> list[Path]:
    """The first task's score after each task, per method (mean and a ±std band over runs), with
    the base model's score on the same concepts as a dashed line (the paper's Figure 2)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.2, 3.6), constrained_layout=True)
    for method, (mean, std) in curves.items():
        steps = np.arange(1, len(mean) + 1)
        (line,) = axis.plot(steps, mean, marker="o", markersize=3, label=method)
        axis.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    axis.axhline(base, color="black", linestyle="--", linewidth=1, label="base model")
    T = max(len(mean) for mean, _ in curves.values())
    axis.set_xticks(range(1, T + 1))
    axis.set_xlabel("after training task i")
    axis.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} on the first task")
    axis.set_title(title)
    axis.legend(fontsize=8, frameon=False)
    paths = _save(figure, stem)
    plt.close(figure)
    return paths


def image_grid(rows: dict[str, dict[int, str]], base_image: str | None, title: str, path: str | Path) -> Path:
    """Rows = methods, columns = the base model then after task 1..T; every cell the same prompt
    and initial noise on the same task (the paper's Figures 3 and 4)."""
    from PIL import Image

    plt = _pyplot()
    T = max(max(cells) for cells in rows.values())
    columns = T + 1
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(1.5 * columns, 1.5 * len(rows) + 0.5), squeeze=False, constrained_layout=True
    )
    for r, (method, cells) in enumerate(rows.items()):
        for c in range(columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            image_path = base_image if c == 0 else cells.get(c)
            if image_path is not None and (c > 0 or r == 0):
                with Image.open(image_path) as image:
                    axis.imshow(image.convert("RGB"))
            if r == 0:
                axis.set_title("base" if c == 0 else f"after {c}", fontsize=9)
            if c == 0:
                axis.set_ylabel(method, fontsize=9)
    figure.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return path
