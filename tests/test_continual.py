"""S, F (both conventions) and P on hand-made matrices, and the summary table over runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lorachain import continual

NAN = math.nan
# a[j, i]: task j after task i. Task 1 peaks after task 2 (max over k >= j, not the diagonal).
A = np.array(
    [
        [0.5, 0.9, 0.6],
        [NAN, 0.8, 0.5],
        [NAN, NAN, 0.7],
    ]
)


def test_summaries_of_a_hand_made_matrix():
    summary = continual.summarize_matrix(A)
    assert summary["S"] == pytest.approx((0.6 + 0.5 + 0.7) / 3)
    # drops: task 1: 0.9 - 0.6 = 0.3, task 2: 0.8 - 0.5 = 0.3, task 3: 0
    assert summary["F"] == pytest.approx(0.3)  # over the first T-1 tasks
    assert summary["F_ref"] == pytest.approx(0.6 / 3)  # the reference's: divided by T, last task included
    assert summary["P"] == pytest.approx((0.5 + 0.8 + 0.7) / 3)


def test_no_forgetting_and_single_task():
    rising = np.array([[0.2, 0.3], [NAN, 0.4]])
    assert continual.summarize_matrix(rising)["F"] == 0.0
    single = continual.summarize_matrix(np.array([[0.7]]))
    assert single["S"] == single["P"] == 0.7 and single["F_ref"] == 0.0 and math.isnan(single["F"])


def test_incomplete_or_nan_matrix_is_an_error():
    holed = A.copy()
    holed[1, 2] = NAN
    with pytest.raises(continual.SummaryError, match=r"a\[2, 3\].*task 2 after task 3"):
        continual.summarize_matrix(holed, "run x")
    with pytest.raises(continual.SummaryError, match="T x T"):
        continual.summarize_matrix(np.ones((2, 3)))


def _scores(a: np.ndarray, concepts: list[str], metric: str = "dino") -> pd.DataFrame:
    T = a.shape[0]
    rows = [
        {"metric": metric, "task": j + 1, "after_task": i + 1, "concept": concepts[j], "score": a[j, i]}
        for i in range(T)
        for j in range(i + 1)
    ]
    return pd.DataFrame(rows)


def test_summary_table_over_runs_and_a_missing_run():
    second = A + 0.1  # every summary but F shifts by 0.1
    runs = {
        ("m", 0, 0): (_scores(A, ["x", "y", "z"]), "run0.csv"),
        ("m", 5, 0): (_scores(second, ["z", "x", "y"]), "run1.csv"),
    }
    matrices = continual.matrix_frame(runs, ["dino"], 3)
    base = pd.DataFrame({"metric": ["dino"] * 3, "concept": ["x", "y", "z"], "score": [0.1, 0.2, 0.3]})
    table = continual.summary_table(matrices, base, ["m"], ["dino"], 3, [(0, 0), (5, 0)])
    row = table.iloc[0]
    assert len(table) == 1 and row["n_runs"] == 2
    assert row["S_mean"] == pytest.approx(0.6 + 0.05) and row["S_std"] == pytest.approx(0.05)
    assert row["F_mean"] == pytest.approx(0.3) and row["F_std"] == pytest.approx(0.0, abs=1e-12)
    assert row["P_mean"] == pytest.approx(2.0 / 3 + 0.05)
    assert row["base"] == pytest.approx(0.2)
    with pytest.raises(continual.SummaryError, match="order 10, seed 0.*missing"):
        continual.summary_table(matrices, base, ["m"], ["dino"], 3, [(0, 0), (10, 0)])
    markdown = continual.markdown_table(table.assign(domain="objects"), "objects")
    assert "| m | dino | 0.6500 ± 0.0500 |" in markdown and "F_ref" in markdown


def test_mean_matrices_and_first_task_curves_are_sequence_aligned():
    runs = {
        ("m", 0, 0): (_scores(A, ["x", "y", "z"]), "run0.csv"),
        ("m", 5, 0): (_scores(A + 0.2, ["z", "x", "y"]), "run1.csv"),
    }
    matrices = continual.matrix_frame(runs, ["dino"], 3)
    mean = continual.mean_matrices(matrices, "dino", 3)["m"]
    np.testing.assert_allclose(mean[np.isfinite(mean)], (A + 0.1)[np.isfinite(A)])
    base = pd.DataFrame({"metric": ["dino"] * 3, "concept": ["x", "y", "z"], "score": [0.1, 0.2, 0.3]})
    curves, base_line = continual.first_task_curves(matrices, base, "dino")
    np.testing.assert_allclose(curves["m"][0], [0.6, 1.0, 0.7])
    np.testing.assert_allclose(curves["m"][1], [0.1, 0.1, 0.1])
    assert base_line == pytest.approx((0.1 + 0.3) / 2)  # the first tasks were x and z


def test_duplicate_or_out_of_range_entries_are_errors():
    scores = _scores(A, ["x", "y", "z"])
    with pytest.raises(continual.SummaryError, match="two scores"):
        continual.run_matrix(pd.concat([scores, scores.iloc[:1]]), "dino", 3, "dup.csv")
    bad = scores.copy()
    bad.loc[0, "task"] = 3
    with pytest.raises(continual.SummaryError, match="bad.csv: entry task 3 after task 1"):
        continual.run_matrix(bad, "dino", 3, "bad.csv")
