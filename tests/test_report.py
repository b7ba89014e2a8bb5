"""The report jobs on hand-made score files: tables, matrices, figures, and missing runs."""

from __future__ import annotations

import pandas as pd
import pytest

from lorachain import provenance
from lorachain.continual import SummaryError
from lorachain.metrics.scoring import write_scores
from lorachain.report.results import continual_table_job, plot_metric_job

T = 3


def run_rows(method, order, seed, concepts, offset):
    return [
        {
            "model": method,
            "method": method,
            "domain": "objects",
            "order": order,
            "seed": seed,
            "after_task": i,
            "task": j,
            "concept": concepts[j - 1],
            "metric": metric,
            "score": 0.5 + offset + 0.1 * j - 0.05 * (i - j),
            "n_images": 4,
            "n_references": 3,
        }
        for i in range(1, T + 1)
        for j in range(1, i + 1)
        for metric in ("dino", "clip_t")
    ]


@pytest.fixture
def score_files(tmp_path):
    files = {}
    for method, offset in (("naive", 0.0), ("magmax", 0.1)):
        for order, concepts in ((0, ["a", "b", "c"]), (5, ["c", "a", "b"])):
            path = tmp_path / method / f"order{order}" / "scores.csv"
            write_scores(run_rows(method, order, 0, concepts, offset), path)
            files[f"{method}|{order}|0"] = str(path)
    base = tmp_path / "base.csv"
    write_scores(
        [
            {
                "model": "base",
                "method": "base",
                "domain": "objects",
                "order": "",
                "seed": "",
                "after_task": 0,
                "task": index,
                "concept": concept,
                "metric": metric,
                "score": 0.3,
                "n_images": 4,
                "n_references": 3,
            }
            for index, concept in enumerate("abc", start=1)
            for metric in ("dino", "clip_t")
        ],
        base,
    )
    return files, str(base)


def table(tmp_path, files, base, **overrides):
    arguments = dict(
        domain="objects",
        run_scores=files,
        base_scores=base,
        methods=["naive", "magmax"],
        metrics=["dino", "clip_t"],
        num_tasks=T,
        orders=[0, 5],
        seeds=[0],
        table=tmp_path / "tables" / "objects.csv",
        markdown=tmp_path / "tables" / "objects.md",
        matrices=tmp_path / "objects" / "matrices.csv",
    )
    return continual_table_job(**{**arguments, **overrides})


def test_table_has_one_row_per_method_and_metric(tmp_path, score_files):
    files, base = score_files
    table(tmp_path, files, base)
    written = pd.read_csv(tmp_path / "tables" / "objects.csv")
    assert list(zip(written["method"], written["metric"])) == [
        ("naive", "dino"),
        ("naive", "clip_t"),
        ("magmax", "dino"),
        ("magmax", "clip_t"),
    ]
    scores = written.drop(columns=["domain", "method", "metric", *provenance.COLUMNS])
    assert (written["n_runs"] == 2).all() and scores.notna().all().all()
    # the provenance columns close the CSV (not the Markdown): this process's versions
    assert list(written.columns[-len(provenance.COLUMNS) :]) == list(provenance.COLUMNS)
    assert (written["diffusers"] == provenance.versions()["diffusers"]).all()
    assert "diffusers" not in (tmp_path / "tables" / "objects.md").read_text()
    naive = written.iloc[0]
    # a[j, i] = 0.5 + 0.1 j - 0.05 (i - j): S = mean_j a[j, 3], P = mean_j a[j, j], F = mean_{j<3} 0.05 (3 - j)
    assert naive["S_mean"] == pytest.approx(0.5 + 0.2 - 0.05) and naive["P_mean"] == pytest.approx(0.7)
    assert naive["F_mean"] == pytest.approx(0.075) and naive["F_ref_mean"] == pytest.approx(0.05)
    assert naive["base"] == pytest.approx(0.3)
    matrices = pd.read_csv(tmp_path / "objects" / "matrices.csv")
    assert len(matrices) == 2 * 2 * 2 * 6  # methods x runs x metrics x (T (T + 1) / 2)
    assert "± " in (tmp_path / "tables" / "objects.md").read_text()


def test_missing_run_is_an_error_not_a_shorter_mean(tmp_path, score_files):
    files, base = score_files
    fewer = {key: path for key, path in files.items() if key != "magmax|5|0"}
    with pytest.raises(SummaryError, match=r"no scores given for runs \[\('magmax', 5, 0\)\]"):
        table(tmp_path, fewer, base)
    incomplete = pd.read_csv(files["naive|5|0"]).iloc[:-2]
    incomplete.to_csv(files["naive|5|0"], index=False)
    with pytest.raises(SummaryError, match=r"order5/scores.csv \(dino\): a\[3, 3\] \(task 3 after task 3\) is missing"):
        table(tmp_path, files, base)


def test_figures_are_written_as_png_and_pdf(tmp_path, score_files):
    files, base = score_files
    table(tmp_path, files, base)
    plot_metric_job(
        domain="objects",
        metric="dino",
        matrices=tmp_path / "objects" / "matrices.csv",
        base_scores=base,
        methods=["naive", "magmax"],
        num_tasks=T,
        heatmap=tmp_path / "fig" / "heatmap-dino.png",
        heatmap_pdf=tmp_path / "fig" / "heatmap-dino.pdf",
        curve=tmp_path / "fig" / "curve-dino.png",
        curve_pdf=tmp_path / "fig" / "curve-dino.pdf",
    )
    for name in ("heatmap-dino", "curve-dino"):
        for suffix in ("png", "pdf"):
            assert (tmp_path / "fig" / f"{name}.{suffix}").stat().st_size > 1000
    with pytest.raises(SummaryError, match="no dino scores for methods \\['ortho_init'\\]"):
        plot_metric_job(
            domain="objects",
            metric="dino",
            matrices=tmp_path / "objects" / "matrices.csv",
            base_scores=base,
            methods=["naive", "ortho_init"],
            num_tasks=T,
            heatmap=tmp_path / "h.png",
            heatmap_pdf=tmp_path / "h.pdf",
            curve=tmp_path / "c.png",
            curve_pdf=tmp_path / "c.pdf",
        )
