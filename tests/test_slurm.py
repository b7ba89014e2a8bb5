"""The workflow through a real SLURM cluster: sbatch submissions, GPU requests, sacct accounting.

The cluster is the one-node test cluster of ci/slurm/start.sh (munge, slurmdbd on a private
mariadb, slurmctld, slurmd with 2 fake GPUs), started for the session (conftest.slurm_cluster) and
stopped afterwards (ci/slurm/stop.sh). The run on it is the rehearsal of config/config.yaml
(conftest.rehearsal_runs), through profiles/slurm-ci, after the local rehearsal, asking for one
domain's results in both regimes (conftest.SLURM_DOMAIN: every rule of the DAG); the two runs'
files of that domain are compared byte for byte. Without `sbatch` on PATH the cluster tests are skipped,
unless LORACHAIN_REQUIRE_SLURM=1 (CI), which installs and starts the cluster or fails.
LORACHAIN_SLURM_RUNNING=1 uses a cluster that is already up (start.sh run by hand) and leaves it up.

The dry-run of the paper grid through profiles/slurm needs no cluster and always runs.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import SLURM_DOMAIN, skip_without_slurm, slurm_env
from test_workflow import job_counts as _job_counts
from test_workflow import paper_workdir

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent
GPU_RULES = {
    "train_task",
    "sample_state",
    "sample_base",
    "embed_references",
    "score_run",
    "score_base",
    "train_concept",
    "record_layer_inputs",
    "merge_and_sample",
    "score_merges",
}


def _snakemake(*args: str, workdir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [PYTHON, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(command, cwd=ROOT, env=slurm_env(), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------- no cluster needed


def test_paper_grid_dry_runs_through_the_cluster_profile(tmp_path):
    """profiles/slurm (executor: slurm, resources scaled by attempt) plans the same DAG as a plain dry-run."""
    config = str(ROOT / "config" / "config.yaml")
    cluster = _snakemake(
        "-n",
        "--profile",
        str(ROOT / "profiles" / "slurm"),
        "--configfile",
        config,
        workdir=paper_workdir(tmp_path / "slurm"),
    )
    assert cluster.returncode == 0, cluster.stdout[-3000:] + cluster.stderr[-3000:]
    local = _snakemake("-n", "--configfile", config, workdir=paper_workdir(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    counts = _job_counts(cluster.stdout)
    assert counts == _job_counts(local.stdout)
    assert counts["total"] == 1807 and counts["train_task"] == 640
    # the profile's per-rule resources reach the jobs (attempt 1)
    train = cluster.stdout[cluster.stdout.index("rule train_task:") :]
    resources = re.search(r"^\s+resources: (.*)$", train, flags=re.M).group(1)
    assert "gpu=1" in resources and "runtime=120" in resources and "mem_mb=48000" in resources, resources


def test_cluster_profile_sizes_every_rule_and_requests_a_gpu_for_every_gpu_rule():
    """A rule added to the workflow gets its runtime/memory (and GPU) in profiles/slurm too."""
    import yaml

    gpu_rules, rules = set(), set()
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", path.read_text(), flags=re.M | re.S):
            rules.add(name)
            if re.search(r"^\s+gpu=1,", body, flags=re.M):
                gpu_rules.add(name)
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["set-resources"]
    assert rules == set(profile), sorted(rules ^ set(profile))
    assert {name for name, block in profile.items() if block.get("gpu") == 1} == gpu_rules


# ------------------------------------------------------------------------------- the cluster


def _sacct(run_uuid: str, since: str) -> list[dict[str, str]]:
    """Every job of this Snakemake run (job name = the run's UUID), one row per allocation."""
    fields = ["JobID", "JobName", "Comment", "ReqTRES", "AllocTRES", "State", "ExitCode", "Submit", "Start", "End"]
    command = ["sacct", "-n", "-P", "-X", "--name", run_uuid, "-S", since, "--format", ",".join(fields)]
    rows = []
    deadline = time.monotonic() + 60
    while True:  # slurmdbd records the end of a job asynchronously: wait until every row has one
        output = subprocess.run(command, env=slurm_env(), capture_output=True, text=True, check=True, timeout=60).stdout
        rows = [dict(zip(fields, line.split("|"))) for line in output.splitlines() if line.strip()]
        if rows and all(row["End"] not in ("", "Unknown") for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def _timestamp(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


@pytest.fixture(scope="module")
def slurm_run(rehearsal_runs):
    """The rehearsal of config/config.yaml through profiles/slurm-ci to SLURM_DOMAIN's tables and
    modular table (run after the local one by conftest.rehearsal_runs), and what sacct saw of it."""
    run = rehearsal_runs["slurm"]
    if run is None:
        skip_without_slurm()
        pytest.skip("the SLURM rehearsal did not run")
    workdir, output = run["workdir"], run["output"]
    since = (datetime.fromtimestamp(run["started"]) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S")
    run_uuid = re.search(r"SLURM run ID: (\S+)", output).group(1)
    queried = time.monotonic()
    jobs = _sacct(run_uuid, since)
    sacct_seconds = time.monotonic() - queried
    # the plugin's kept logs: .snakemake/slurm_logs/rule_<rule>/<wildcards>/<slurm jobid>.log
    logs = {path.stem: path for path in (workdir / ".snakemake" / "slurm_logs").rglob("*.log")}
    for job in jobs:
        log = logs.get(job["JobID"])
        job["rule"] = (
            log.relative_to(workdir / ".snakemake" / "slurm_logs").parts[0].removeprefix("rule_") if log else None
        )
        job["wildcards"] = log.parent.name if log else None
        job["log"] = log
    run = {**run, "jobs": jobs}
    run["figures"] = _figures(run, run["cluster"])
    run["figures"]["sacct_query_seconds"] = round(sacct_seconds, 1)
    (workdir / "slurm-figures.json").write_text(json.dumps(run["figures"], indent=2))
    print("\nSLURM run figures:", json.dumps(run["figures"], indent=2))
    return run


def _figures(run: dict, cluster: dict) -> dict:
    """Submission latency, status-poll latency of chained jobs, wall time (seconds)."""
    jobs = run["jobs"]
    by_key = {(job["rule"], job["wildcards"]): job for job in jobs}
    chained = []
    for (rule, wildcards), job in sorted(by_key.items(), key=lambda item: str(item[0])):
        # task t of a run is submitted after task t-1 ended; sampling after task t after task t ended
        if rule == "train_task" and not wildcards.endswith("_01"):
            previous = by_key.get(("train_task", f"{wildcards[:-2]}{int(wildcards[-2:]) - 1:02d}"))
        elif rule == "sample_state":
            previous = by_key.get(("train_task", wildcards))
        else:
            continue
        if previous:
            chained.append({"job": f"{rule}[{wildcards}]", "after": f"train_task[{previous['wildcards']}]",
                            "seconds": _timestamp(job["Submit"]) - _timestamp(previous["End"])})  # fmt: skip
    submits = sorted(_timestamp(job["Submit"]) for job in jobs)
    ends = sorted(_timestamp(job["End"]) for job in jobs)
    latencies = [item["seconds"] for item in chained]
    return {
        "cluster_start_seconds": round(cluster["start_seconds"], 1),
        "snakemake_wall_seconds": round(run["wall"], 1),
        "sbatch_jobs": len(jobs),
        "first_sbatch_after_start_seconds": round(submits[0] - run["started"], 1),  # sacct has 1 s resolution
        "last_job_end_to_exit_seconds": round(run["started"] + run["wall"] - ends[-1], 1),
        "chained_submit_latency_seconds": {
            "mean": round(sum(latencies) / len(latencies), 1),
            "min": min(latencies),
            "max": max(latencies),
        },
        "chained": chained,
        "job_seconds_mean": round(sum(_timestamp(j["End"]) - _timestamp(j["Start"]) for j in jobs) / len(jobs), 1),
        "queue_wait_seconds_mean": round(
            sum(_timestamp(j["Start"]) - _timestamp(j["Submit"]) for j in jobs) / len(jobs), 1
        ),
    }


@pytest.mark.slow
def test_slurm_run_writes_the_continual_and_the_modular_table(slurm_run):
    from lorachain.metrics.catalog import DEFAULT_METRICS

    config, workdir = slurm_run["config"], slurm_run["workdir"]
    block = config["domains"][SLURM_DOMAIN]
    table = workdir / "results" / "tables" / f"{SLURM_DOMAIN}.csv"
    assert table.is_file(), slurm_run["output"][-3000:]
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    expected = sorted(
        (method, metric) for method in config["methods"] for metric in DEFAULT_METRICS[block["dataset"]["layout"]]
    )
    composed = [row for row in rows if ": " in row["metric"]]  # the composition's rows ("pairs: min dino")
    rows = [row for row in rows if ": " not in row["metric"]]
    assert sorted((row["method"], row["metric"]) for row in rows) == expected
    assert all(row["n_runs"] == "1" and math.isfinite(float(row["S_mean"])) for row in rows + composed), rows
    assert {row["method"] for row in composed} == set(config["methods"])
    with (workdir / "results" / "tables" / f"{SLURM_DOMAIN}-modular.csv").open() as handle:
        merges = [row["merge"] for row in csv.DictReader(handle)]
    assert merges == list(config["modular"]["merges"])


# wall-clock measurements: the only fields allowed to differ
TIMED = "merge_s", "read_s", "record_s", "load_s", "total_s", "merge_with_recording_s"


def _comparable(path: Path) -> bytes:
    """A file's bytes, or for the modular regime's records and tables (which carry merge and
    recording times) their content without the timing fields."""
    import pandas as pd

    if path.name == "merge.json" or (path.name.startswith("grams-") and path.suffix == ".json"):
        record = json.loads(path.read_text())
        return json.dumps({key: value for key, value in record.items() if key not in TIMED}, sort_keys=True).encode()
    if path.parent.name == "tables" and path.suffix == ".csv":  # modular tables carry merge and recording times
        frame = pd.read_csv(path)
        return frame.drop(columns=[column for column in TIMED if column in frame]).to_csv(index=False).encode()
    return path.read_bytes()


def _digests(workdir: Path) -> dict[str, str]:
    """sha256 of what must not depend on the process or executor: LoRA files, manifests, losses,
    sample PNGs and their indexes, scores, reference embeddings, Gram matrices and tables."""
    import hashlib

    results = workdir / "results"

    def keep(path: Path) -> bool:
        if {"benchmarks", "figures"} & set(path.parts):
            return False
        return path.suffix in (".safetensors", ".json", ".png", ".csv", ".md")

    return {
        str(path.relative_to(results)): hashlib.sha256(_comparable(path)).hexdigest()
        for path in sorted(results.rglob("*"))
        if path.is_file()
        and keep(path)
        and not path.name.endswith("-modular.md")  # the .md shows the same rows as the .csv
    }


def _of_the_slurm_domain(name: str) -> bool:
    """Whether a results path (relative to results/) belongs to SLURM_DOMAIN, the SLURM run's target."""
    parts = Path(name).parts
    in_tables = parts[0] == "tables" and re.match(rf"{SLURM_DOMAIN}[.-]", parts[-1]) is not None
    return parts[0] == SLURM_DOMAIN or in_tables


@pytest.mark.slow
def test_the_local_and_the_slurm_rehearsal_write_identical_bytes(slurm_run, rehearsal_run):
    """Same config and seeds, two Snakemake runs (local and SLURM executors), every job a separate
    process, PYTHONHASHSEED 1 and 2: every LoRA, manifest, sample PNG, score file and table is
    byte-identical; only the measured merge times differ."""
    local, cluster = _digests(rehearsal_run["workdir"]), _digests(slurm_run["workdir"])
    local = {name: digest for name, digest in local.items() if _of_the_slurm_domain(name)}
    assert sorted(local) == sorted(cluster)
    assert (
        sum(name.endswith(".safetensors") for name in local) >= 16
        and sum(name.endswith(".png") for name in local) >= 16
    )
    differ = sorted(name for name in local if local[name] != cluster[name])
    assert differ == [], differ[:20]
    print(f"\n{len(local)} files byte-identical between the local and the SLURM rehearsal")


@pytest.mark.slow
def test_every_job_but_all_went_through_sbatch(slurm_run):
    counts = Counter(job["rule"] for job in slurm_run["jobs"])
    planned = _job_counts(slurm_run["output"])
    assert counts == {rule: count for rule, count in planned.items() if rule not in ("all", "total")}, counts
    assert all(job["State"] == "COMPLETED" and job["ExitCode"] == "0:0" for job in slurm_run["jobs"]), slurm_run["jobs"]


@pytest.mark.slow
def test_gpu_rules_request_one_gpu_and_cpu_rules_none(slurm_run):
    for job in slurm_run["jobs"]:
        if job["rule"] in GPU_RULES:
            assert "gres/gpu=1" in job["ReqTRES"] and "gres/gpu=1" in job["AllocTRES"], job
        else:
            assert "gres/gpu" not in job["AllocTRES"], job
        # the plugin's comment names the rule (AccountingStoreFlags=job_comment)
        assert job["Comment"].startswith(f"rule_{job['rule']}"), job


@pytest.mark.slow
def test_every_train_task_job_completed_on_a_gpu(slurm_run):
    config = slurm_run["config"]
    train = [job for job in slurm_run["jobs"] if job["rule"] == "train_task"]
    assert len(train) == len(config["methods"]) * config["domains"][SLURM_DOMAIN]["num_tasks"]
    for job in train:
        assert job["State"] == "COMPLETED", job
        assert "gres/gpu=1" in job["AllocTRES"], job
        log = job["log"].read_text()
        assert "rule train_task:" in log and "--executor slurm-jobstep" in log, log[-2000:]
        assert re.search(r"resources: .*slurm_account=ci.*gpu=1", log), log[-2000:]
    # task 2 of a run was submitted only after task 1 of the same run had ended
    for item in slurm_run["figures"]["chained"]:
        assert item["seconds"] >= 0, item


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda profile: profile["default-resources"].pop("slurm_account"), "no SLURM account"),
        (
            lambda profile: profile["set-resources"]["train_task"].update(slurm_partition="gpu-a100"),
            "'gpu-a100' does not exist",
        ),
    ],
    ids=["no-account", "unknown-partition"],
)
def test_bad_cluster_settings_fail_before_any_submission(slurm_cluster, rehearsal_setup, tmp_path, edit, message):
    import yaml

    profile = yaml.safe_load((ROOT / "profiles" / "slurm-ci" / "config.yaml").read_text())
    edit(profile)
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    result = _snakemake(
        "--profile",
        str(tmp_path / "profile"),
        f"--configfile={rehearsal_setup['path']}",
        workdir=tmp_path / "run",
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output, output[-3000:]
    assert "SLURM profile check failed before any job was submitted" in output
    assert "has been submitted with SLURM jobid" not in output, output[-3000:]
