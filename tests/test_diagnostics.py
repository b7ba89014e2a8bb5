"""Interference diagnostics (cosine similarity, sign conflicts; BlockLoRA paper Figure 4) and the
``lorachain inspect`` command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorachain.lora import Concept, LayerAdapter, LoraFileError, read_lora
from lorachain.merging.diagnostics import (
    STAT_COLUMNS,
    cosine_tables,
    layerwise_cosine,
    pairwise_cosine,
    plot_cosine_heatmap,
    plot_sign_conflicts,
    sign_conflicts,
    unique_labels,
)
from lorachain.methods.blocklora import block_mask
from lorachain.torch_env import torch

LAYERS = {"down.attn1.to_q": (12, 10), "down.attn2.to_k": (12, 16), "up.attn1.to_out.0": (9, 12)}


def random_concept(name, seed, rank=3, scale=0.5, num_blocks=None, slot=None) -> Concept:
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for layer, (out_features, in_features) in sorted(LAYERS.items()):
        B = torch.randn(out_features, rank, generator=g)
        if num_blocks is not None:
            B = B * block_mask(out_features, num_blocks, slot)
        adapters[layer] = LayerAdapter(A=torch.randn(rank, in_features, generator=g), B=B, scale=scale)
    return Concept(name=name, adapters=adapters, slot=slot)


def dense_cosine(first: torch.Tensor, second: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(first.flatten().double(), second.flatten().double(), dim=0))


def test_cosine_from_factors_equals_dense_cosine():
    concepts = [random_concept(f"c{i}", i) for i in range(3)]
    # make one pair strongly aligned so the values are not all near 0
    concepts[2].adapters["down.attn1.to_q"].B = concepts[0].adapters["down.attn1.to_q"].B * 2 + 0.1
    concepts[2].adapters["down.attn1.to_q"].A = concepts[0].adapters["down.attn1.to_q"].A.clone()
    wide, long = cosine_tables(concepts)
    assert list(wide.index) == sorted(LAYERS) and list(wide.columns[:3]) == list(STAT_COLUMNS)
    assert list(wide.columns[3:]) == ["c0 ~ c1", "c0 ~ c2", "c1 ~ c2"]
    assert len(long) == 3 * len(LAYERS) and list(long.columns) == ["layer", "concept_a", "concept_b", "cosine"]
    for row in long.itertuples():
        a, b = (next(c for c in concepts if c.name == n) for n in (row.concept_a, row.concept_b))
        assert row.cosine == pytest.approx(dense_cosine(a.delta(row.layer), b.delta(row.layer)), abs=1e-6)
        assert wide.loc[row.layer, f"{row.concept_a} ~ {row.concept_b}"] == row.cosine
    assert wide.loc["down.attn1.to_q", "c0 ~ c2"] > 0.9
    pair_values = wide[["c0 ~ c1", "c0 ~ c2", "c1 ~ c2"]]
    assert wide["mean_cosine"].tolist() == pytest.approx(pair_values.mean(axis=1).tolist())
    assert wide["max_abs_cosine"].tolist() == pytest.approx(pair_values.abs().max(axis=1).tolist())
    assert layerwise_cosine(concepts).equals(wide) and pairwise_cosine(concepts).equals(long)


def test_zero_delta_has_no_direction():
    concepts = [random_concept("a", 1), random_concept("b", 2), random_concept("c", 3)]
    concepts[1].adapters["down.attn1.to_q"].B = torch.zeros(12, 3)
    wide = layerwise_cosine(concepts)
    assert wide["a ~ b"].isna().tolist() == [True, False, False]
    assert wide.loc["down.attn1.to_q", "mean_cosine"] == pytest.approx(
        wide.loc["down.attn1.to_q", "a ~ c"]
    )  # NaN skipped


def test_blocklora_deltas_of_different_slots_have_zero_cosine_and_no_sign_conflicts():
    blocks = [random_concept(f"slot{k}", 10 + k, num_blocks=4, slot=k) for k in range(4)]
    wide = layerwise_cosine(blocks)
    assert (wide[list(STAT_COLUMNS)] == 0).all().all()
    conflicts = sign_conflicts(blocks)
    assert (
        conflicts["k"].tolist() == [2, 3, 4]
        and (conflicts["conflicting_entries"] == 0).all()
        and (conflicts["fraction"] == 0).all()
    )
    total = sum(o * i for o, i in LAYERS.values())
    # with k of 4 blocks merged, the touched entries are exactly the k blocks' rows
    assert conflicts["active_entries"].tolist()[-1] == total and (conflicts["total_entries"] == total).all()
    # the same factors without masks interfere: both measures go up
    plain = [random_concept(f"plain{k}", 10 + k) for k in range(4)]
    assert layerwise_cosine(plain)["max_abs_cosine"].max() > 0.05
    plain_conflicts = sign_conflicts(plain)
    assert plain_conflicts["fraction"].iloc[0] == pytest.approx(0.5, abs=0.1)  # random signs: about one half for 2
    assert plain_conflicts["fraction"].iloc[-1] == pytest.approx(1 - 2**-3, abs=0.08)  # and 1 - 2^(1-k)
    assert plain_conflicts["fraction"].is_monotonic_increasing


def test_sign_conflict_definition_on_hand_made_deltas():
    """Entries active among the first k deltas (any nonzero) with both signs present; zeros take no side."""

    def concept(name, delta):
        return Concept(
            name=name,
            adapters={"l": LayerAdapter(A=torch.eye(4), B=torch.tensor(delta, dtype=torch.float32), scale=1.0)},
        )

    a = concept("a", [[1.0, -1.0, 0.0, 0.0]])
    b = concept("b", [[2.0, 0.0, 0.0, 3.0]])
    c = concept("c", [[-1.0, -5.0, 0.0, 0.0]])
    table = sign_conflicts([a, b, c])
    # k=2: active entries 0, 1, 3 (2 is zero in both); no entry has both signs -> 0 of 3
    # k=3: entry 0 (+1, +2, -1) conflicts; entry 1 (-1, 0, -5) has one sign -> 1 of 3
    assert table[["k", "added", "active_entries", "conflicting_entries", "total_entries"]].values.tolist() == [
        [2, "b", 3, 0, 4],
        [3, "c", 3, 1, 4],
    ]
    assert table["fraction"].tolist() == pytest.approx([0.0, 1 / 3])
    # order matters: "the first k"
    assert sign_conflicts([a, c, b])["conflicting_entries"].tolist() == [1, 1]
    # atol: tiny values count as zero
    tiny = concept("tiny", [[-1e-9, 0.0, 0.0, 0.0]])
    assert sign_conflicts([a, tiny])["conflicting_entries"].tolist() == [1]
    assert sign_conflicts([a, tiny], atol=1e-6)["conflicting_entries"].tolist() == [0]


def test_diagnostics_refuse_incompatible_or_too_few_loras():
    a = random_concept("a.safetensors", 1)
    b = random_concept("b.safetensors", 2)
    b.adapters.pop("up.attn1.to_out.0")
    with pytest.raises(LoraFileError, match=r"b\.safetensors and a\.safetensors adapt different layers"):
        layerwise_cosine([a, b])
    with pytest.raises(LoraFileError, match="different layers"):
        sign_conflicts([a, b])
    with pytest.raises(ValueError, match="at least 2"):
        sign_conflicts([a])
    with pytest.raises(ValueError, match="unique"):
        layerwise_cosine([a, random_concept("a.safetensors", 3)])


def test_plots_are_written(tmp_path):
    concepts = [random_concept(f"c{i}", i) for i in range(3)]
    wide = layerwise_cosine(concepts)
    for table, name in [(wide, "pairs.png"), (wide[["mean_cosine"]], "mean.png")]:
        path = plot_cosine_heatmap(table, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_sign_conflicts(sign_conflicts(concepts), tmp_path / "sub" / "signs.png").stat().st_size > 1000


def test_unique_labels():
    assert unique_labels(["r/naive/task01/lora.safetensors", "r/naive/task02/lora.safetensors"]) == ["task01", "task02"]
    assert unique_labels(["x/dog.safetensors", "y/cat.safetensors"]) == ["dog.safetensors", "cat.safetensors"]
    assert unique_labels(["a/t1/lora.safetensors", "b/t1/lora.safetensors"]) == ["a/t1", "b/t1"]
    assert unique_labels(["same.safetensors", "same.safetensors"]) == ["same.safetensors", "same.safetensors"]


# ------------------------------------------------------------------------------------------ CLI


def write_lora_file(path: Path, concept: Concept, rank=3, alpha=3) -> Path:
    """A LoRA file in diffusers' layout (unet.<layer>.lora_A/B.weight, lora_adapter_metadata JSON)."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, adapter in concept.adapters.items():
        tensors[f"unet.{layer}.lora_A.weight"] = adapter.A.contiguous()
        tensors[f"unet.{layer}.lora_B.weight"] = adapter.B.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, str(path), metadata={"lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": alpha})}
    )
    return path


def lorachain_command() -> list[str]:
    script = Path(sys.executable).parent / "lorachain"  # the installed console script, when installed
    return [str(script)] if script.exists() else [sys.executable, "-m", "lorachain.cli"]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*lorachain_command(), *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_inspect_end_to_end(tmp_path):
    files = [
        write_lora_file(
            tmp_path / "loras" / f"task0{k + 1}" / "pytorch_lora_weights.safetensors",
            random_concept(f"c{k}", k, num_blocks=None),
        )
        for k in range(3)
    ]
    result = run_cli("inspect", *files, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "3 LoRA files, 3 layers each" in result.stdout
    assert "task01" in result.stdout and "rank 3" in result.stdout and "k=2" in result.stdout and "k=3" in result.stdout
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert written == ["cosine.csv", "cosine.png", "cosine_pairs.csv", "sign_conflicts.csv", "sign_conflicts.png"]
    import pandas as pd

    cosine = pd.read_csv(tmp_path / "report" / "cosine.csv", index_col="layer")
    assert list(cosine.index) == sorted(LAYERS) and "task01 ~ task02" in cosine.columns
    expected = layerwise_cosine([read_lora(f) for f in files])
    assert cosine["mean_cosine"].tolist() == pytest.approx(expected["mean_cosine"].tolist())
    conflicts = pd.read_csv(tmp_path / "report" / "sign_conflicts.csv")
    assert conflicts["k"].tolist() == [2, 3] and conflicts["added"].tolist() == ["task02", "task03"]

    named = run_cli("inspect", *files, "--names", "dog", "cat", "ink")
    assert named.returncode == 0 and "dog" in named.stdout


def test_cli_inspect_bad_input_exits_2_naming_the_file(tmp_path):
    single = write_lora_file(tmp_path / "only.safetensors", random_concept("c", 1))
    result = run_cli("inspect", single)
    assert result.returncode == 2
    assert (
        "at least 2 LoRA files" in result.stderr
        and "only.safetensors" in result.stderr
        and "Traceback" not in result.stderr
    )

    other = random_concept("d", 2)
    other.adapters["down.attn2.to_k"] = LayerAdapter(A=torch.randn(3, 20), B=torch.randn(12, 3), scale=1.0)
    mismatched = write_lora_file(tmp_path / "other_arch.safetensors", other)
    result = run_cli("inspect", single, mismatched)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "other_arch.safetensors" in result.stderr
        and "only.safetensors" in result.stderr
        and "down.attn2.to_k" in result.stderr
    )

    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    result = run_cli("inspect", single, tmp_path / "broken.safetensors")
    assert result.returncode == 2 and "broken.safetensors" in result.stderr and "Traceback" not in result.stderr

    poisoned = random_concept("e", 3)
    poisoned.adapters["down.attn1.to_q"].B[0, 0] = float("nan")
    result = run_cli("inspect", single, write_lora_file(tmp_path / "nan.safetensors", poisoned))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nan.safetensors: key" in result.stderr and "non-finite value(s) (NaN or inf)" in result.stderr, (
        result.stderr
    )

    result = run_cli("inspect", single, single, "--names", "one")
    assert result.returncode == 2 and "--names" in result.stderr
    assert run_cli().returncode == 2  # no subcommand: argparse's usage error
