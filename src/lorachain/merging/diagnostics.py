"""How much concept LoRAs would interfere if merged (BlockLoRA paper, Figure 4).

Two measures over the dense deltas delta_i = scale_i B_i A_i of each targeted layer:

* **Layer-wise cosine similarity** of the flattened deltas of every pair of concepts. It is computed
  from the factors, never densely: <s1 B1 A1, s2 B2 A2>_F = s1 s2 sum((B1^T B2) ⊙ (A1 A2^T)), an
  r x r product (float64), and likewise the norms. A pair where one delta is zero has no direction:
  its cosine is NaN and the means skip it. :func:`layerwise_cosine` gives one row per layer (sorted)
  with ``mean_cosine`` (the paper's "layer-wise average cosine similarity"), ``mean_abs_cosine``,
  ``max_abs_cosine`` and one column per pair; :func:`pairwise_cosine` the same values as a long
  table (layer, concept_a, concept_b, cosine).

* **Sign conflicts** when merging the first k concepts, k = 2..N (in the order given). An entry of
  a layer's delta matrix is *active* for k if at least one of the first k deltas is nonzero there,
  and *conflicting* if those nonzero values do not all share one sign (one positive and one negative
  suffice; zeros take no side). The fraction reported is conflicting / active, summed over all
  entries of all layers: the denominator leaves out entries no concept touches, so BlockLoRA's
  masked rows neither dilute nor inflate the figure. Random dense deltas give about 1/2 for k = 2
  and 1 - 2^(1-k) in general, the paper's "about half for 2, nearly all for 10". Entries count as
  nonzero when |value| > ``atol`` (default 0: exact zeros, which masked rows are).

Everything runs one layer at a time (two boolean masks of one layer's shape for the sign counts), so
SDXL-size files never need every dense delta in memory at once. Plots use matplotlib's Agg canvas
through :class:`matplotlib.figure.Figure`, touching no global pyplot state.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

from lorachain.lora import LoraFile, check_compatible

STAT_COLUMNS = ("mean_cosine", "mean_abs_cosine", "max_abs_cosine")
PAIR_SEPARATOR = " ~ "


def unique_labels(paths: Sequence[str | Path]) -> list[str]:
    """Shortest trailing path parts that tell the files apart ("task01", not the shared file name)."""
    parts = [Path(p).parts for p in paths]
    if len(set(map(tuple, parts))) < len(parts):
        return [str(p) for p in paths]  # the same file twice: nothing shorter distinguishes them
    same_name = len({p[-1] for p in parts}) == 1 and len(parts) > 1
    trimmed = [p[:-1] if same_name and len(p) > 1 else p for p in parts]
    for depth in range(1, max(map(len, trimmed)) + 1):
        labels = ["/".join(p[-depth:]) for p in trimmed]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _named(items: Sequence, names: Sequence[str] | None) -> list[tuple[str, dict]]:
    """(label, adapters) of LoraFile / Concept items."""
    if names is not None and len(names) != len(items):
        raise ValueError(f"{len(names)} name(s) given for {len(items)} LoRA(s)")
    if names is None:
        if all(isinstance(item, LoraFile) for item in items):
            names = unique_labels([item.path for item in items])
        else:
            names = [str(item.name) for item in items]
    if len(set(names)) != len(names):
        raise ValueError(f"concept names must be unique, got {list(names)}")
    return [(name, item.adapters) for name, item in zip(names, items)]


def _gram_inner(first, second) -> float:
    """<delta_1, delta_2>_F from the factors, float64."""
    inner_B = first.B.double().T @ second.B.double()  # (r1, r2)
    inner_A = first.A.double() @ second.A.double().T  # (r1, r2)
    return float(first.scale * second.scale * (inner_B * inner_A).sum())


def cosine_tables(items: Sequence, names: Sequence[str] | None = None):
    """(wide per-layer table, long per-pair table) of cosine similarities; see the module docstring."""
    import pandas as pd

    check_compatible(list(items))
    named = _named(items, names)
    if len(named) < 2:
        raise ValueError("cosine similarity needs at least 2 LoRAs")
    pairs = list(combinations(range(len(named)), 2))
    long_rows, wide_rows = [], []
    for layer in sorted(named[0][1]):
        adapters = [adapters[layer] for _, adapters in named]
        norms = [max(_gram_inner(a, a), 0.0) ** 0.5 for a in adapters]
        row = {"layer": layer}
        for i, j in pairs:
            denominator = norms[i] * norms[j]
            cosine = _gram_inner(adapters[i], adapters[j]) / denominator if denominator > 0 else float("nan")
            long_rows.append({"layer": layer, "concept_a": named[i][0], "concept_b": named[j][0], "cosine": cosine})
            row[f"{named[i][0]}{PAIR_SEPARATOR}{named[j][0]}"] = cosine
        wide_rows.append(row)
    wide = pd.DataFrame(wide_rows).set_index("layer")
    pair_columns = list(wide.columns)
    wide.insert(0, "max_abs_cosine", wide[pair_columns].abs().max(axis=1))
    wide.insert(0, "mean_abs_cosine", wide[pair_columns].abs().mean(axis=1))
    wide.insert(0, "mean_cosine", wide[pair_columns].mean(axis=1))
    return wide, pd.DataFrame(long_rows, columns=["layer", "concept_a", "concept_b", "cosine"])


def layerwise_cosine(items: Sequence, names: Sequence[str] | None = None):
    """One row per layer (sorted): mean_cosine, mean_abs_cosine, max_abs_cosine, one column per pair."""
    return cosine_tables(items, names)[0]


def pairwise_cosine(items: Sequence, names: Sequence[str] | None = None):
    """Long table: layer, concept_a, concept_b, cosine."""
    return cosine_tables(items, names)[1]


def sign_conflicts(items: Sequence, names: Sequence[str] | None = None, atol: float = 0.0):
    """For k = 2..N: entries active among the first k deltas, those with conflicting signs, the
    fraction, and the k-th concept's name (definition in the module docstring)."""
    import pandas as pd

    check_compatible(list(items))
    named = _named(items, names)
    count = len(named)
    if count < 2:
        raise ValueError("sign conflicts need at least 2 LoRAs")
    active = [0] * (count + 1)
    conflicting = [0] * (count + 1)
    total = 0
    for layer in sorted(named[0][1]):
        has_positive = has_negative = None
        for k, (_, adapters) in enumerate(named, start=1):
            delta = adapters[layer].delta()
            positive, negative = delta > atol, delta < -atol
            has_positive = positive if has_positive is None else has_positive | positive
            has_negative = negative if has_negative is None else has_negative | negative
            if k >= 2:
                active[k] += int((has_positive | has_negative).sum())
                conflicting[k] += int((has_positive & has_negative).sum())
        total += has_positive.numel()
    rows = [
        {
            "k": k,
            "added": named[k - 1][0],
            "active_entries": active[k],
            "conflicting_entries": conflicting[k],
            "total_entries": total,
            "fraction": conflicting[k] / active[k] if active[k] else 0.0,
        }
        for k in range(2, count + 1)
    ]
    return pd.DataFrame(rows)


def plot_cosine_heatmap(table, path: str | Path) -> Path:
    """Heatmap of a :func:`layerwise_cosine` table: one row per pair (or the layer-wise mean when the
    table has no pair columns), one column per layer, diverging colours centred at 0."""
    from matplotlib.figure import Figure

    pair_columns = [c for c in table.columns if c not in STAT_COLUMNS]
    columns = pair_columns or ["mean_cosine"]
    values = table[columns].to_numpy(dtype=float).T  # (pairs, layers)
    finite = values[~(values != values)]
    limit = max(float(abs(finite).max()) if finite.size else 0.0, 1e-3)
    figure = Figure(figsize=(min(4 + 0.08 * len(table), 20), min(2 + 0.3 * len(columns), 14)), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(values, aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
    axes.set_xlabel(f"layer (sorted name order, {len(table)} layers)")
    axes.set_yticks(range(len(columns)), labels=columns, fontsize=7 if len(columns) > 10 else 9)
    axes.set_title(
        "Layer-wise cosine similarity of LoRA deltas" + (" per pair" if pair_columns else " (mean over pairs)")
    )
    figure.colorbar(image, ax=axes, label="cosine similarity")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_sign_conflicts(table, path: str | Path) -> Path:
    """Fraction of active entries with sign conflicts against the number of merged LoRAs."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.subplots()
    axes.plot(table["k"], table["fraction"], marker="o")
    axes.set_xlabel("number of merged LoRAs k")
    axes.set_ylabel("fraction with sign conflicts")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xticks(list(table["k"]))
    axes.grid(alpha=0.3)
    axes.set_title("Sign conflicts among the first k LoRAs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
