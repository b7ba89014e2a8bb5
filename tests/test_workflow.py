"""The Snakemake workflow: the paper grid's DAG (dry-run), config validation, and the demo end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(*args, workdir: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [*SNAKEMAKE, "--snakefile", str(ROOT / "Snakefile"), *args]
    if workdir is not None:
        command += ["--directory", str(workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(output: str) -> dict[str, int]:
    table = output[output.index("Job stats:") :]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def write_config(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --------------------------------------------------------------------------------- paper grid


def test_paper_grid_dry_run_job_counts(tmp_path):
    result = snakemake("-n", "--configfile", str(ROOT / "config" / "config.yaml"), workdir=tmp_path)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    # 2 domains x 4 methods x 4 order seeds x 2 training seeds x 10 tasks
    assert counts == {"prepare_tasks": 2 * 4, "train_task": 2 * 4 * 4 * 2 * 10, "all": 1, "total": 649}
    assert "build_tiny_model" not in counts  # the real model is a hub id: nothing is built or downloaded


TASK_STATE = re.compile(r"results/(\w+)/(\w+)/order(-?\d+)-seed(-?\d+)/task(\d+)/state\.json")


def _train_jobs(dry_run_output: str) -> dict[tuple, set[tuple]]:
    """(domain, method, order, seed, task) of every train_task job -> the task states it reads."""
    jobs = {}
    parts = re.split(r"^rule (\w+):$", dry_run_output, flags=re.M)
    for rule, block in zip(parts[1::2], parts[2::2]):
        if rule != "train_task":
            continue
        fields = dict(re.findall(r"^\s+(input|output): (.*)$", block, flags=re.M))
        (output,) = TASK_STATE.findall(fields["output"])
        key = (*output[:4], int(output[4]))
        jobs[key] = {(*match[:4], int(match[4])) for match in TASK_STATE.findall(fields.get("input", ""))}
    return jobs


def test_paper_grid_task_t_depends_on_task_t_minus_1_of_the_same_run(tmp_path):
    result = snakemake("-n", "--configfile", str(ROOT / "config" / "config.yaml"), workdir=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = _train_jobs(result.stdout)
    assert len(jobs) == 640
    for (domain, method, order, seed, task), reads in jobs.items():
        # the job reads the chain 1..t-1 of its own run (it folds it on load), and nothing else
        assert reads == {(domain, method, order, seed, previous) for previous in range(1, task)}, (domain, method, task)
        if task > 1:
            assert (domain, method, order, seed, task - 1) in reads


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["training"].update(rnak=4), "rnak"),
        (lambda c: c["methods"].update(fancy={"method": "no_such_method"}), "no_such_method"),
        (lambda c: c["methods"]["ortho_init"].update(variant="diagonal"), "diagonal"),
        (lambda c: c["methods"]["magmax"].update(threshold=0.5), "threshold"),
        (lambda c: c["domains"]["objects"].update(num_tasks=0), "num_tasks"),
        (lambda c: c.update(model={"pretrained": "a/b", "tiny": "sd1"}), "model"),
    ],
)
def test_invalid_config_fails_the_dry_run_naming_the_key(tmp_path, edit, message):
    result = snakemake("-n", "--configfile", str(write_config(tmp_path, edit)), workdir=tmp_path)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    result = snakemake("--profile", str(ROOT / "profiles" / "local"), "--configfile", str(ROOT / "config" / "demo.yaml"), workdir=workdir, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir, yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


@pytest.mark.slow
def test_demo_trains_every_chain(demo_run):
    from lorachain.state import LORA_FILE, read_chain

    workdir, config = demo_run
    for domain, block in config["domains"].items():
        tasks = json.loads((workdir / "results" / domain / "tasks" / "order0.json").read_text())["tasks"]
        assert len(tasks) == block["num_tasks"]
        for method in config["methods"]:
            last = workdir / "results" / domain / method / "order0-seed0" / f"task{block['num_tasks']:02d}"
            chain = read_chain(last)
            assert [manifest["task_index"] for _, manifest in chain] == list(range(1, block["num_tasks"] + 1))
            assert [manifest["concept"] for _, manifest in chain] == [task["concept"] for task in tasks]
            for directory, manifest in chain:
                assert manifest["method"]["name"] == config["methods"][method]["method"]
                assert manifest["run"] == {"domain": domain, "method": method, "order": 0, "seed": 0}
                assert (directory / LORA_FILE).stat().st_size == manifest["bytes"]["lora"]
                assert (workdir / "logs" / domain / method / "order0-seed0" / f"{directory.name}.log").is_file()
                assert (directory / "loss.csv").read_text().count("\n") == config["training"]["steps"] + 1


@pytest.mark.slow
def test_demo_rerun_has_nothing_to_do(demo_run):
    workdir, _ = demo_run
    result = snakemake("-n", "--configfile", str(ROOT / "config" / "demo.yaml"), workdir=workdir)
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_demo_failure_of_a_bad_dataset_names_the_directory(tmp_path):
    def point_at_missing(config):
        config["domains"] = {"objects": {"dataset": {"layout": "dreambooth", "root": str(tmp_path / "nowhere")}, "num_tasks": 2}}

    result = snakemake("--cores", "1", "--configfile", str(write_config(tmp_path, point_at_missing)), workdir=tmp_path)
    assert result.returncode != 0
    log = (tmp_path / "logs" / "objects" / "tasks" / "order0.log").read_text()
    assert str(tmp_path / "nowhere") in log
    assert not list((tmp_path / "results").rglob("state.json"))
