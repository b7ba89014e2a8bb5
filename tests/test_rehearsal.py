"""The paper's path, rehearsed: config/config.yaml with only its models (local stand-ins of the same
classes, loaded by path), its dataset roots (the real DreamBooth copy, a generated UnlearnCanvas
tree) and its sizes substituted, run end to end through profiles/local. The SLURM rehearsal is in
test_slurm.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, snakemake_command
from test_workflow import job_counts

from lorachain.rehearsal import allowed, substituted_keys


def _walk(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else key)
    else:
        yield path, value


def test_the_rehearsal_substitutes_only_models_roots_and_sizes(rehearsal_setup):
    paper, config = rehearsal_setup["paper"], rehearsal_setup["config"]
    changed = substituted_keys(paper, config)
    assert changed and all(allowed(key) for key in changed), sorted(key for key in changed if not allowed(key))
    assert not [key for key, _ in _walk(config) if key.split(".")[-1] in ("tiny", "tiny_seed")]  # no tiny: code path
    # every model the paper names by hub id or file is now a local stand-in of the same class
    for key in (
        "model.pretrained",
        "model.vae",
        "metrics.dino.pretrained",
        "metrics.clip.pretrained",
        "metrics.csd.checkpoint",
    ):
        assert key in changed
        value = dict(_walk(config))[key]
        assert Path(value).is_absolute() and Path(value).exists(), (key, value)
    for name in ("model_index.json", "unet/config.json", "text_encoder_2/config.json"):
        assert (Path(config["model"]["pretrained"]) / name).is_file()
    assert json.loads((Path(config["model"]["vae"]) / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert config["training"]["gradient_checkpointing"] is True and config["methods"] == paper["methods"]
    assert (
        config["modular"]["adapters"] == paper["modular"]["adapters"]
        and config["modular"]["merges"] == paper["modular"]["merges"]
    )


@pytest.mark.slow
def test_the_rehearsal_writes_both_tables_the_modular_table_and_the_report(rehearsal_run):
    workdir, config = rehearsal_run["workdir"], rehearsal_run["config"]
    for domain in config["domains"]:
        table = pd.read_csv(workdir / "results" / "tables" / f"{domain}.csv")
        assert sorted(set(table["method"])) == sorted(config["methods"])
        composed = table["metric"].str.contains(": ")  # a composition's rows: F_ref is not defined for them
        numbers = table.drop(columns=["domain", "method", "metric"]).select_dtypes("number")
        assert numbers[~composed].map(math.isfinite).all().all(), table
        assert numbers[composed].drop(columns=["F_ref_mean", "F_ref_std"]).map(math.isfinite).all().all(), table
    pairs = pd.read_csv(workdir / "results" / "tables" / "objects.csv")
    assert set(pairs.loc[pairs["metric"].str.startswith("pairs: "), "method"]) == set(config["methods"])
    modular = pd.read_csv(workdir / "results" / "tables" / "objects-modular.csv")
    assert list(modular["merge"]) == list(config["modular"]["merges"])
    assert modular[["image_alignment", "text_alignment", "average"]].map(math.isfinite).all().all(), modular
    html = (workdir / "results" / "report.html").read_text()
    for name in ("objects.csv", "styles.csv", "objects-modular.csv", "grid.png"):
        assert name in html, name


@pytest.mark.slow
def test_the_rehearsal_trained_on_the_stand_ins_by_path(rehearsal_run):
    workdir, config = rehearsal_run["workdir"], rehearsal_run["config"]
    state = json.loads(
        (workdir / "results" / "objects" / "naive" / "order0-seed0" / "task02" / "state.json").read_text()
    )
    assert state["base_model"] == config["model"]["pretrained"] and state["architecture"] == "StableDiffusionXLPipeline"
    tasks = json.loads((workdir / "results" / "objects" / "tasks" / "order0.json").read_text())
    assert Path(tasks["dataset_root"]) == Path(config["domains"]["objects"]["dataset"]["root"]).resolve()
    assert not (workdir / "resources").exists()  # nothing was built: every model came from its path


@pytest.mark.slow
def test_a_corrupt_lora_is_refused_and_deleting_the_named_directory_reruns_it_and_what_follows(rehearsal_run, tmp_path):
    """Truncate task 1's LoRA of one run: the next job that reads it fails naming the file and the
    directory to delete; once deleted, Snakemake retrains task 1 and task 2 of that run."""
    workdir = tmp_path / "run"
    shutil.copytree(rehearsal_run["workdir"], workdir, symlinks=True)
    run_dir = workdir / "results" / "objects" / "naive" / "order0-seed0"
    lora = run_dir / "task01" / "pytorch_lora_weights.safetensors"
    size = lora.stat().st_size
    with open(lora, "r+b") as handle:
        handle.truncate(size - 100)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    target = "results/objects/naive/order0-seed0/task02/state.json"
    args = ("--profile", str(ROOT / "profiles" / "local"), f"--configfile={rehearsal_run['path']}", target)
    failed = subprocess.run(
        snakemake_command(*args, workdir=workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert failed.returncode != 0
    log = (workdir / "logs" / "objects" / "naive" / "order0-seed0" / "task02.log").read_text()
    assert f"{lora.absolute()}: {size - 100} bytes, but" in log and f"recorded {size} bytes" in log, log[-3000:]
    assert f"delete the directory {lora.parent.absolute()} and rerun the workflow" in log

    shutil.rmtree(lora.parent)
    rerun = subprocess.run(
        snakemake_command(*args, workdir=workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    counts = job_counts(rerun.stdout + rerun.stderr)
    assert counts == {"train_task": 2, "total": 2}, counts  # task 1 and task 2 of this run, nothing else
    assert lora.stat().st_size == size
    # the failed attempt's log is kept beside the new one (and the first run's beside it)
    logs = workdir / "logs" / "objects" / "naive" / "order0-seed0"
    assert "bytes, but" in (logs / "task02.log.1").read_text() and "bytes, but" not in (logs / "task02.log").read_text()


@pytest.mark.slow
def test_the_rehearsal_exports_every_final_state_and_merge(rehearsal_run, tmp_path):
    """`snakemake export` with the paper config's export block: every run's final state and every
    merge at its largest k as diffusers and kohya files of the stand-in SDXL U-Net, exact where the
    method declares a sum of low-rank terms, else SVD at export.svd_rank; the kohya file reads back
    through diffusers' converters with the diffusers file's layers."""
    from lorachain.export import DIFFUSERS_FILE, KOHYA_FILE, RECORD_FILE
    from lorachain.lora import read_lora
    from lorachain.plan import export_outputs

    workdir, config = tmp_path / "run", rehearsal_run["config"]
    shutil.copytree(rehearsal_run["workdir"], workdir, symlinks=True)
    args = ("export", "--profile", str(ROOT / "profiles" / "local"), "--resources", "gpu=2")
    result = subprocess.run(
        snakemake_command(*args, f"--configfile={rehearsal_run['path']}", workdir=workdir),
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    exports = export_outputs(config)
    assert job_counts(result.stdout + result.stderr)["total"] == len(exports) + 1  # + the target rule
    rank, svd_rank = config["training"]["rank"], config["export"]["svd_rank"]
    for export in exports:
        record = json.loads((workdir / export / RECORD_FILE).read_text())
        diffusers, kohya = read_lora(workdir / export / DIFFUSERS_FILE), read_lora(workdir / export / KOHYA_FILE)
        assert sorted(kohya.adapters) == sorted(diffusers.adapters), export
        if record["exact"]:  # a sum of rank-r terms: at most (tasks or concepts) x r
            assert record["rank"]["max"] in range(rank, rank * len(record["concepts"]) + 1), (export, record)
        else:
            assert record["rank"] == {"min": svd_rank, "max": svd_rank} and record["relative_error"] >= 0, export
    assert any(json.loads((workdir / e / RECORD_FILE).read_text())["exact"] for e in exports)
    assert not all(json.loads((workdir / e / RECORD_FILE).read_text())["exact"] for e in exports)


def test_the_rehearsal_command_writes_a_config_that_dry_runs(tmp_path):
    from conftest import REAL_DREAMBOOTH

    if not (REAL_DREAMBOOTH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"the real DreamBooth dataset is absent ({REAL_DREAMBOOTH})")
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "lorachain.cli",
        "rehearsal",
        str(tmp_path),
        "--dreambooth",
        str(REAL_DREAMBOOTH),
        "--paper",
        str(ROOT / "config" / "config.yaml"),
    ]
    written = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr[-3000:]
    assert f"--configfile={tmp_path / 'config.yaml'} --directory {tmp_path}" in written.stdout
    dry = subprocess.run(
        snakemake_command("-n", f"--configfile={tmp_path / 'config.yaml'}", workdir=tmp_path),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    counts = job_counts(dry.stdout)
    assert counts["train_task"] == 4 * 2 * 2 and "build_tiny_model" not in counts
    assert counts["train_concept"] == 7 * (2 + 2)  # 7 adapter kinds; 2 objects, the mixed set's 2 concepts
    again = [
        *command[:4],
        str(tmp_path / "again"),
        "--dreambooth",
        str(tmp_path / "nowhere"),
        "--paper",
        str(ROOT / "config" / "config.yaml"),
    ]
    missing = subprocess.run(again, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "not a DreamBooth dataset" in missing.stderr
