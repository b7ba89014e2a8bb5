"""Provenance: versions, the git commit and the model revision recorded by states and tables, the
`model.revision` pin reaching from_pretrained, and the run's provenance table."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorachain import plan, provenance
from lorachain.paths import STATE_FILE
from lorachain.provenance import PACKAGES, ProvenanceError
from lorachain.report.provenance import provenance_rows, provenance_table_job

SHA_MAIN, SHA_V2 = "1" * 40, "2" * 40


def git(directory: Path, *arguments: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    done = subprocess.run(["git", "-C", str(directory), *arguments], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_versions_are_importlib_metadata_s():
    recorded = provenance.record(None)["versions"]
    assert recorded == {name: importlib.metadata.version(name) for name in PACKAGES}
    assert set(PACKAGES) == {"torch", "diffusers", "peft", "transformers", "accelerate", "lorachain"}


def test_git_commit_and_dirty_flag_of_a_checkout_and_none_outside_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("a = 1\n")
    git(repo, "add", "code.py")
    git(repo, "commit", "-q", "-m", "first")
    assert provenance.git_state(repo) == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False}
    (repo / "code.py").write_text("a = 2\n")
    (repo / "untracked.txt").write_text("results are not code\n")
    provenance._git_state.cache_clear()  # one process sees one checkout state; this test edits it
    assert provenance.git_state(repo) == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": True}
    outside = tmp_path / "plain"
    outside.mkdir()
    assert provenance.git_state(outside) == {"commit": None, "dirty": None}


def test_lorachain_s_own_checkout_is_recorded():
    source = Path(provenance.__file__).parent
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected = commit.stdout.strip() if commit.returncode == 0 else None
    assert provenance.record(None)["git"]["commit"] == expected


# ------------------------------------------------------------------------------ hub revisions


def fake_hub_cache(root: Path, save) -> Path:
    """A hub cache holding org/tiny at two commits: main -> SHA_MAIN (seed 0), tag v2 -> SHA_V2
    (seed 1), in huggingface_hub's layout (models--org--tiny/{refs,snapshots/<sha>})."""
    repo = root / "models--org--tiny"
    for sha, seed in ((SHA_MAIN, 0), (SHA_V2, 1)):
        save(repo / "snapshots" / sha, seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA_MAIN)
    (repo / "refs" / "v2").write_text(SHA_V2)
    return root


def write_index(directory: Path, seed: int) -> None:
    directory.mkdir(parents=True)
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "seed": seed}))


def test_hub_revision_is_the_snapshot_the_ref_points_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hub", write_index)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert provenance.model_record("org/tiny")["revision"] == SHA_MAIN
    assert provenance.model_record("org/tiny", revision="v2")["revision"] == SHA_V2
    pinned = provenance.model_record("org/tiny@v2")
    assert pinned == {
        "source": "org/tiny",
        "kind": "hub",
        "revision": SHA_V2,
        "requested_revision": "v2",
        "fingerprint": None,
    }
    assert provenance.model_record("org/absent")["revision"] is None  # offline and not cached: unknown
    assert provenance.columns(provenance.record("org/tiny@v2"))["model_revision"] == SHA_V2


def test_local_model_is_fingerprinted_by_its_configs_not_its_weights(tmp_path):
    model = tmp_path / "model"
    write_index(model, 0)
    (model / "unet").mkdir()
    (model / "unet" / "config.json").write_text('{"a": 1}')
    (model / "unet" / "weights.safetensors").write_bytes(b"x")
    first = provenance.model_record(model)
    assert first["kind"] == "local" and first["revision"] is None and len(first["fingerprint"]) == 64
    (model / "unet" / "weights.safetensors").write_bytes(b"other weights")
    assert provenance.model_record(model)["fingerprint"] == first["fingerprint"]
    (model / "unet" / "config.json").write_text('{"a": 2}')
    assert provenance.model_record(model)["fingerprint"] != first["fingerprint"]
    assert provenance.columns(provenance.record(model))["model_revision"].startswith("local:")


def test_revision_pins_only_hub_ids(tmp_path):
    assert plan.model_source({"model": {"pretrained": "org/name", "revision": "v2"}}) == "org/name@v2"
    assert plan.model_source({"model": {"pretrained": "org/name"}}) == "org/name"
    assert provenance.split_revision("org/name@v2") == ("org/name", "v2")
    assert provenance.split_revision(str(tmp_path)) == (str(tmp_path), None)
    for model in ({"pretrained": str(tmp_path), "revision": "v2"}, {"tiny": "sd1", "revision": "v2"}):
        with pytest.raises(ProvenanceError, match="config key model.revision"):
            plan.model_source({"model": model})


LOAD = """
import sys
from lorachain.models.loading import load_pipeline
from lorachain.provenance import model_record
pipe = load_pipeline(sys.argv[1])
weight = pipe.unet.conv_in.weight
print(repr(float(weight.double().sum())), model_record(sys.argv[1])["revision"])
"""


def load_in_cache(cache: Path, source: str) -> tuple[float, str]:
    """Load `source` in a process whose hub cache is `cache`, offline: (a U-Net weight sum, revision)."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD, source], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    total, revision = done.stdout.split()
    return float(total), revision


def test_model_revision_reaches_from_pretrained(tmp_path):
    """A tiny pipeline in a fake hub cache at two commits: the pin loads the tagged one."""
    from safetensors.torch import load_file

    from lorachain.models.tiny import save_tiny_pipeline

    def save(directory, seed):
        save_tiny_pipeline("sd1", directory, seed=seed)

    cache = fake_hub_cache(tmp_path / "hub", save)
    snapshots = cache / "models--org--tiny" / "snapshots"
    unet = "unet/diffusion_pytorch_model.safetensors"
    expected = {
        sha: float(load_file(str(snapshots / sha / unet))["conv_in.weight"].double().sum())
        for sha in (SHA_MAIN, SHA_V2)
    }
    assert expected[SHA_MAIN] != expected[SHA_V2]
    for source, sha in (("org/tiny", SHA_MAIN), ("org/tiny@v2", SHA_V2), (f"org/tiny@{SHA_V2}", SHA_V2)):
        total, revision = load_in_cache(cache, source)
        assert total == expected[sha] and revision == sha, source


def test_loading_a_missing_revision_names_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lorachain.models.loading import ModelError, load_pipeline

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load 'org/never-cached' at revision 'nope'"):
        load_pipeline("org/never-cached@nope")


# ------------------------------------------------------------------------------ states and tables


def test_a_trained_state_records_its_provenance(tmp_path, tiny_sd1_dir, synthetic_tasks):
    from lorachain.train import train_task

    prompt, images = synthetic_tasks[0]
    manifest = train_task(
        model_source=str(tiny_sd1_dir),
        train_images=images,
        train_prompt=prompt,
        task_index=1,
        previous_state=None,
        method_name="naive",
        method_params={},
        training=dict(rank=2, lora_alpha=2, steps=1, resolution=64, batch_size=1),
        seed=0,
        output_dir=tmp_path / "task01",
        progress=False,
    )
    written = json.loads((tmp_path / "task01" / STATE_FILE).read_text())["provenance"]
    assert written == manifest["provenance"]
    assert written["versions"] == {name: importlib.metadata.version(name) for name in PACKAGES}
    assert written["git"] == provenance.git_state()
    assert written["model"] == {
        "source": str(tiny_sd1_dir),
        "kind": "local",
        "revision": None,
        "requested_revision": None,
        "fingerprint": provenance.config_fingerprint(tiny_sd1_dir),
    }


def fake_state(directory: Path, torch_version: str | None) -> str:
    """A state manifest recording `torch_version` (None: written before provenance was recorded)."""
    directory.mkdir(parents=True)
    manifest = {"format": 2}
    if torch_version is not None:
        record = provenance.record(None)
        record["versions"]["torch"] = torch_version
        manifest["provenance"] = record
    (directory / STATE_FILE).write_text(json.dumps(manifest))
    return str(directory / STATE_FILE)


def test_provenance_table_shows_two_rows_when_states_record_different_versions(tmp_path):
    same = [fake_state(tmp_path / "a" / f"task{i}", "2.13.0") for i in (1, 2)]
    mixed = [fake_state(tmp_path / "b" / "task1", "2.13.0"), fake_state(tmp_path / "b" / "task2", "2.14.0")]
    unrecorded = [fake_state(tmp_path / "c" / "task1", None)]  # from before provenance was recorded
    table = tmp_path / "objects.csv"
    table.write_text("domain,S_mean," + ",".join(provenance.COLUMNS) + "\n")
    with table.open("a") as handle:
        csv.writer(handle).writerow(["objects", 0.5, *provenance.table_columns(None).values()])
    rows = provenance_table_job(
        states={"objects": same, "styles": mixed, "old": unrecorded},
        tables=[str(table)],
        table=tmp_path / "run-provenance.csv",
        markdown_table=tmp_path / "run-provenance.md",
    )
    groups = ("objects", "styles", "old", "tables")
    by_group = {group: [row for row in rows if row["group"] == group] for group in groups}
    assert [row["files"] for row in by_group["objects"]] == [2] and not by_group["objects"][0]["mixed"]
    assert [row["torch"] for row in by_group["styles"]] == ["2.13.0", "2.14.0"]
    assert by_group["old"][0]["torch"] is None and not by_group["old"][0]["mixed"]
    assert all(row["mixed"] for row in by_group["styles"])
    assert by_group["tables"][0]["torch"] == importlib.metadata.version("torch")
    with open(tmp_path / "run-provenance.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert "**Mixed provenance**: styles" in (tmp_path / "run-provenance.md").read_text()
    assert provenance_rows({"objects": same}, [])[0]["mixed"] is False
