"""The Snakemake workflow: the paper grid's DAG (dry-run), config validation, and the demo end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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


def paper_workdir(path: Path) -> Path:
    """A working directory for dry-runs of config/config.yaml: the CSD checkpoint it names is checked
    while the Snakefile is parsed, so it must exist (an empty placeholder is enough for a dry-run)."""
    (path / "data" / "csd").mkdir(parents=True, exist_ok=True)
    (path / "data" / "csd" / "checkpoint.pth").touch()
    return path


def write_config(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------------------------- lint


def test_snakemake_lint_is_clean():
    """Every rule has a log and a conda env, no absolute paths: `snakemake --lint` finds nothing."""
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Lints for" not in result.stdout + result.stderr, result.stdout[-4000:]


def test_every_rule_but_all_uses_the_cluster_conda_env():
    """--software-deployment-method conda builds envs/lorachain.yaml for every job."""
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = path.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        assert text.count('conda:\n        "../../envs/lorachain.yaml"') == len(rules), path


# --------------------------------------------------------------------------------- paper grid


def test_paper_grid_dry_run_job_counts(tmp_path):
    result = snakemake("-n", "--configfile", str(ROOT / "config" / "config.yaml"), workdir=paper_workdir(tmp_path))
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    runs = 2 * 4 * 4 * 2  # domains x methods x order seeds x training seeds
    assert counts == {
        "prepare_tasks": 2 * 4,
        "train_task": runs * 10,
        "sample_state": runs * 10,  # one per (run, after task i)
        "sample_base": 3,  # objects, styles and the mixed set
        "embed_references": 3,  # once per domain or set, reused by every scoring job
        "score_run": runs,
        "score_base": 3,  # the mixed set's too: its composition's base row
        "continual_table": 2,
        "plot_metric": 2 * 5,  # domains x their 5 default metrics
        "image_grid": 2,
        "loss_curves": 2,  # one training-loss figure per domain
        # the modular regime on objects (10 concepts) and on mixed15 (10 objects + 5 styles):
        # 7 adapter kinds each; 12 merges at 6 merge sizes on objects, at 7 on mixed15 (15 added)
        "prepare_mix": 1,
        "train_concept": (10 + 15) * 7,
        # only the adapters that gradient fusion merges, once per way of recording (2 fusion merges)
        "record_layer_inputs": (10 + 15) * 2,
        "merge_and_sample": 12 * 6 + 12 * 7,
        "score_merges": 12 * 2,
        "modular_results": 2,
        "modular_ablation": 2,  # Table 3's layout, per set
        "modular_prior_drift": 2,
        "lora_diagnostics": 7 * 2,
        "modular_composition": 2,  # stylized (mixed15) and pairs (objects)
        "provenance_table": 1,  # one for the run
        "all": 1,
        "total": 1807,
    }
    # real models are hub ids: nothing is built or downloaded
    assert "build_tiny_model" not in counts and "build_tiny_encoder" not in counts


def test_paper_grid_table_target_dry_runs_only_its_domain(tmp_path):
    result = snakemake(
        "-n",
        "results/tables/styles.csv",
        "--configfile",
        str(ROOT / "config" / "config.yaml"),
        workdir=paper_workdir(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["train_task"] == counts["sample_state"] == 4 * 4 * 2 * 10 and counts["continual_table"] == 1
    assert "plot_metric" not in counts and "results/objects" not in result.stdout


TASK_STATE = re.compile(r"results/(\w+)/(\w+)/order(-?\d+)-seed(-?\d+)/task(\d+)/state\.json")


SAMPLES = re.compile(r"results/(\w+)/(\w+)/order(-?\d+)-seed(-?\d+)/samples/after(\d+)")


def _jobs(dry_run_output: str, rule_name: str, output_pattern: re.Pattern) -> dict[tuple, set[tuple]]:
    """(domain, method, order, seed, task) of every job of a rule -> the task states it reads."""
    jobs = {}
    parts = re.split(r"^rule (\w+):$", dry_run_output, flags=re.M)
    for rule, block in zip(parts[1::2], parts[2::2]):
        if rule != rule_name:
            continue
        fields = dict(re.findall(r"^\s+(input|output): (.*)$", block, flags=re.M))
        (output,) = output_pattern.findall(fields["output"])
        key = (*output[:4], int(output[4]))
        jobs[key] = {(*match[:4], int(match[4])) for match in TASK_STATE.findall(fields.get("input", ""))}
    return jobs


def _train_jobs(dry_run_output: str) -> dict[tuple, set[tuple]]:
    return _jobs(dry_run_output, "train_task", TASK_STATE)


def test_paper_grid_task_t_depends_on_task_t_minus_1_of_the_same_run(tmp_path):
    result = snakemake("-n", "--configfile", str(ROOT / "config" / "config.yaml"), workdir=paper_workdir(tmp_path))
    assert result.returncode == 0, result.stderr
    jobs = _train_jobs(result.stdout)
    assert len(jobs) == 640
    for (domain, method, order, seed, task), reads in jobs.items():
        # the job reads the chain 1..t-1 of its own run (it folds it on load), and nothing else
        assert reads == {(domain, method, order, seed, previous) for previous in range(1, task)}, (domain, method, task)
        if task > 1:
            assert (domain, method, order, seed, task - 1) in reads
    samplers = _jobs(result.stdout, "sample_state", SAMPLES)
    assert len(samplers) == 640
    for (domain, method, order, seed, task), reads in samplers.items():
        # sampling after task i folds the chain 1..i of its own run
        assert reads == {(domain, method, order, seed, previous) for previous in range(1, task + 1)}


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
        (lambda c: c["sampling"].update(stepz=3), "stepz"),
        (lambda c: c["sampling"].update(resolution=60), "resolution"),
        (lambda c: c["metrics"].update(csd={"tiny": True, "checkpoint": "x.pth"}), "csd"),
        (lambda c: c["domains"]["objects"].update(metrics=["dino", "fid"]), "fid"),
        (lambda c: c["methods"].update(base={"method": "naive"}), "base"),
        (lambda c: c["compositions"]["together"].update(groups=[[1, 4]]), "compositions.together.groups"),
        (lambda c: c["compositions"]["stylized"]["prompts"].append("a {subject} alone"), "missing ['style']"),
        (lambda c: c["compositions"]["together"].update(sett="objects"), "sett"),
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
    # The demo has no GPU work: two single-threaded jobs at a time use both cores of a CI machine.
    result = snakemake(
        "--profile",
        str(ROOT / "profiles" / "local"),
        "--resources",
        "gpu=2",
        "--configfile",
        str(ROOT / "config" / "tiny.yaml"),
        workdir=workdir,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workdir, yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())


@pytest.mark.slow
def test_demo_trains_every_chain(demo_run):
    from lorachain.state import LORA_FILE, read_chain

    workdir, config = demo_run
    for domain, block in config["domains"].items():
        tasks = json.loads((workdir / "results" / domain / "tasks" / "order0.json").read_text())["tasks"]
        assert len(tasks) == (block.get("task_pool") or block["num_tasks"])
        for method in config["methods"]:
            last = workdir / "results" / domain / method / "order0-seed0" / f"task{block['num_tasks']:02d}"
            chain = read_chain(last)
            assert [manifest["task_index"] for _, manifest in chain] == list(range(1, block["num_tasks"] + 1))
            assert [manifest["concept"] for _, manifest in chain] == [
                task["concept"] for task in tasks[: block["num_tasks"]]
            ]
            for directory, manifest in chain:
                assert manifest["method"]["name"] == config["methods"][method]["method"]
                assert manifest["run"] == {"domain": domain, "method": method, "order": 0, "seed": 0}
                assert (directory / LORA_FILE).stat().st_size == manifest["bytes"]["lora"]
                assert (workdir / "logs" / domain / method / "order0-seed0" / f"{directory.name}.log").is_file()
                assert (directory / "loss.csv").read_text().count("\n") == config["training"]["steps"] + 1


@pytest.mark.slow
def test_demo_tables_have_one_finite_row_per_method_and_metric(demo_run):
    import pandas as pd

    from lorachain import provenance
    from lorachain.metrics.catalog import DEFAULT_METRICS

    workdir, config = demo_run
    for domain, block in config["domains"].items():
        written = pd.read_csv(workdir / "results" / "tables" / f"{domain}.csv")
        table = written[~written["metric"].str.contains(": ")]  # a composition's rows are "<name>: <metric>"
        metrics = DEFAULT_METRICS[block["dataset"]["layout"]]
        assert sorted(zip(table["method"], table["metric"])) == sorted(
            (m, metric) for m in config["methods"] for metric in metrics
        )
        numbers = table.drop(columns=["domain", "method", "metric", *provenance.COLUMNS])
        assert numbers.map(lambda value: pd.notna(value) and abs(value) < float("inf")).all().all(), table
        assert (written["torch"] == provenance.versions()["torch"]).all()  # what wrote the table
        assert (table["n_runs"] == len(config["orders"]) * len(config["seeds"])).all()
        assert (workdir / "results" / "tables" / f"{domain}.md").read_text().count("\n| ") == len(written) + 1


@pytest.mark.slow
def test_demo_samples_every_state_on_its_tasks(demo_run):
    from lorachain.sample import read_index

    workdir, config = demo_run
    sampling = config["sampling"]
    for domain, block in config["domains"].items():
        T = block["num_tasks"]
        base = read_index(workdir / "results" / domain / "base" / "samples")
        pool = block.get("task_pool") or T  # the base model is sampled on every concept of the pool
        # every concept: 5 prompts and its class prompt without the concept (prior drift), N noises
        assert len(base) == pool * (5 + 1) * sampling["num_samples"]
        for method in config["methods"]:
            for after in range(1, T + 1):
                index = read_index(
                    workdir / "results" / domain / method / "order0-seed0" / "samples" / f"after{after:02d}"
                )
                assert sorted(set(index["task"])) == list(range(1, after + 1))
                assert len(index) == after * (5 + 1) * sampling["num_samples"]
                assert set(index["noise_seed"]) == {sampling["noise_seed"]}


@pytest.mark.slow
def test_demo_figures_and_report(demo_run):
    from lorachain.metrics.catalog import DEFAULT_METRICS

    workdir, config = demo_run
    for domain, block in config["domains"].items():
        figures = workdir / "results" / "figures" / domain
        assert (figures / "grid.png").stat().st_size > 1000
        for metric in DEFAULT_METRICS[block["dataset"]["layout"]]:
            for name in (f"heatmap-{metric}", f"curve-{metric}"):
                assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert (figures / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    result = snakemake("--report", "report.html", "--configfile", str(ROOT / "config" / "tiny.yaml"), workdir=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    for name in ("objects.csv", "styles.csv", "heatmap-csd.png", "curve-dino.png", "grid.png", "sequence position"):
        assert name in html, name


@pytest.mark.slow
def test_demo_modular_branch_writes_table_curve_and_diagnostics(demo_run):
    import pandas as pd

    workdir, config = demo_run
    modular = config["modular"]
    table = pd.read_csv(workdir / "results" / "tables" / "objects-modular.csv")
    assert list(table["merge"]) == list(modular["merges"])
    assert (table["k"] == max(modular["merge_sizes"])).all()
    assert table[["merge_s", "image_alignment", "text_alignment", "average"]].notna().all().all()
    assert table[["text_clipscore", "average_clipscore", "prior_drift"]].notna().all().all()
    assert (table["text_clipscore"] != table["text_alignment"]).all()  # two conventions, two scales
    ablation = pd.read_csv(workdir / "results" / "tables" / "objects-ablation.csv")
    assert list(ablation["merge"]) == modular["ablation"]
    assert (figures_dir := workdir / "results" / "figures" / "objects" / "modular-prior-drift.png").is_file(), (
        figures_dir
    )
    assert set(table.loc[table["merge"] == "gradient_fusion", "merge_type"]) == {"post-training (closed form)"}
    fusion = table["merge"] == "gradient_fusion"  # its time with the concepts' recording, and only its
    assert (table.loc[fusion, "record_s"] > 0).all() and table.loc[~fusion, "record_s"].isna().all()
    assert (table["merge_with_recording_s"] >= table["merge_s"]).all()
    assert set(table.loc[table["merge"] != "gradient_fusion", "merge_type"]) == {"instant"}
    figures = workdir / "results" / "figures" / "objects"
    assert (figures / "modular-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for adapter in modular["adapters"]:
        for kind in ("cosine", "sign-conflicts"):
            assert (figures / f"diagnostics-{adapter}-{kind}.png").stat().st_size > 1000
    # BlockLoRA's concepts touch disjoint rows: no sign conflicts at all; plain LoRAs conflict
    blocks = pd.read_csv(
        workdir / "results" / "objects" / "modular" / "diagnostics" / "blocklora" / "sign_conflicts.csv"
    )
    plain = pd.read_csv(workdir / "results" / "objects" / "modular" / "diagnostics" / "lora" / "sign_conflicts.csv")
    assert (blocks["conflicting_entries"] == 0).all() and (plain["fraction"] > 0.1).all()
    # every merged model was sampled on exactly its k concepts, with the same concepts as the tasks
    tasks = json.loads((workdir / "results" / "objects" / "tasks" / "order0.json").read_text())["tasks"]
    for merge in modular["merges"]:
        for k in modular["merge_sizes"]:
            index = pd.read_csv(
                workdir / "results" / "objects" / "modular" / "merges" / merge / f"k{k}" / "samples" / "index.csv"
            )
            assert sorted(index["concept"].unique()) == sorted(task["concept"] for task in tasks[:k])
    # the concept states are standard diffusers LoRAs with their slot in the manifest
    state = json.loads(
        (
            workdir / "results" / "objects" / "modular" / "adapters" / "blocklora" / "concept02" / "state.json"
        ).read_text()
    )
    assert state["slot"] == 1 and state["task_index"] == 1 and state["parent"] is None


@pytest.mark.slow
def test_demo_mixed_set_scores_each_concept_by_its_own_domains_metrics(demo_run):
    """modular.mixes draws concepts of both kinds into one merge; each is scored with its own
    domain's metrics, and the table averages each concept's own image metric."""
    import pandas as pd

    from lorachain.metrics.catalog import DEFAULT_METRICS

    workdir, config = demo_run
    ((name, counts),) = config["modular"]["mixes"].items()
    tasks = json.loads((workdir / "results" / name / "tasks" / "order0.json").read_text())
    objects = json.loads((workdir / "results" / "objects" / "tasks" / "order0.json").read_text())["tasks"]
    styles = json.loads((workdir / "results" / "styles" / "tasks" / "order0.json").read_text())["tasks"]
    assert tasks["members"] == ["objects"] * counts["objects"] + ["styles"] * counts["styles"]
    assert tasks["tasks"] == objects[: counts["objects"]] + styles[: counts["styles"]]
    for merge in config["modular"]["merges"]:
        scores = pd.read_csv(workdir / "results" / name / "modular" / "merges" / merge / "scores.csv")
        for position, member in enumerate(tasks["members"], start=1):
            own = scores[scores["task"] == position]
            layout = config["domains"][member]["dataset"]["layout"]
            assert set(own["metric"]) == set(DEFAULT_METRICS[layout]), (merge, position)
    table = pd.read_csv(workdir / "results" / "tables" / f"{name}-modular.csv")
    assert set(table["image_metric"]) == {"clip_i/dino"} and set(table["prior_metric"]) == {
        "prior_drift_clip/prior_drift_csd"
    }
    assert table[["image_alignment", "text_alignment", "text_clipscore", "prior_drift"]].notna().all().all()
    # its own slots: concept 2 (a style) is BlockLoRA's second block, not the styles domain's first
    state = json.loads(
        (workdir / "results" / name / "modular" / "adapters" / "blocklora" / "concept02" / "state.json").read_text()
    )
    assert state["slot"] == 1 and state["concept"] == styles[0]["concept"]


@pytest.mark.slow
def test_demo_compositions_are_sampled_scored_and_reported_in_both_regimes(demo_run):
    """Each member of a composed prompt is scored by its own domain's image metrics against its own
    references; the modular set gets a table, a by-k file, a figure and a grid; the continual
    table gets the composition's rows (only states that learned the whole group sample it)."""
    import pandas as pd

    from lorachain.composition import read_composition_index

    workdir, config = demo_run
    stylized, together = config["compositions"]["stylized"], config["compositions"]["together"]
    mix = stylized["set"]
    scores = pd.read_csv(workdir / "results" / mix / "modular" / "merges" / "blocklora" / "composition-scores.csv")
    assert set(zip(scores["member"], scores["metric"])) == {
        ("subject", "dino"), ("subject", "clip_i"), ("style", "csd"), ("style", "dino"),
        ("prompt", "clip_t"), ("prompt", "clip_score"),
    }  # fmt: skip
    table = pd.read_csv(workdir / "results" / "tables" / f"{mix}-composition-stylized.csv")
    assert list(table["merge"]) == ["base", *config["modular"]["merges"]]
    assert {"subject dino", "style csd", "min dino", "clip_score"} <= set(table.columns)
    assert table.drop(columns=["merge", "k"]).notna().all().all()
    figures = workdir / "results" / "figures" / mix
    assert (figures / "composition-stylized-grid.png").stat().st_size > 1000
    assert (figures / "composition-stylized.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # objects: the pair (1, 2) is in the merges of k >= 2 only, and in continual states after task 2
    merges = workdir / "results" / together["set"] / "modular" / "merges" / "weighted_average"
    assert read_composition_index(merges / "k1" / "compositions").empty
    assert set(read_composition_index(merges / "k3" / "compositions")["group"]) == {"1+2"}
    run = workdir / "results" / "objects" / "naive" / "order0-seed0" / "compositions"
    assert read_composition_index(run / "after01").empty and len(read_composition_index(run / "after02")) > 0
    continual = pd.read_csv(workdir / "results" / "tables" / "objects.csv")
    rows = continual[continual["metric"] == "together: min dino"]
    assert list(rows["method"]) == list(config["methods"])
    assert rows[["S_mean", "F_mean", "P_mean", "base"]].notna().all().all()
    assert ((rows["P_mean"] - rows["S_mean"] - rows["F_mean"]).abs() < 1e-6).all()


def planned_jobs(output: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job in a dry-run's plan."""
    jobs = []
    parts = re.split(r"^rule (\w+):$", output, flags=re.M)
    for rule, block in zip(parts[1::2], parts[2::2]):
        match = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        wildcards = dict(item.split("=", 1) for item in match.group(1).split(", ")) if match else {}
        jobs.append((rule, wildcards))
    return jobs


def replan(workdir: Path, tmp_path: Path, edit) -> list[tuple[str, dict]]:
    """The dry-run plan of the finished demo after editing its config (with the local profile's
    rerun triggers)."""
    path = write_config(tmp_path, edit)
    result = snakemake("-n", "--profile", str(ROOT / "profiles" / "local"), "--configfile", str(path), workdir=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return [] if "Nothing to be done" in result.stdout + result.stderr else planned_jobs(result.stdout)


REPORT_RULES = {"continual_table", "plot_metric", "image_grid", "loss_curves", "provenance_table", "all"}


@pytest.mark.slow
def test_reformatted_yaml_reruns_nothing(demo_run, tmp_path):
    workdir, _ = demo_run

    def reorder(config):
        for key in list(config):  # reverse the order of every block's keys
            value = config.pop(key)
            config[key] = dict(reversed(value.items())) if isinstance(value, dict) else value
        config["methods"] = {name: dict(reversed(block.items())) for name, block in reversed(config["methods"].items())}

    assert replan(workdir, tmp_path, reorder) == []


@pytest.mark.slow
def test_one_method_hyperparameter_reruns_only_that_method(demo_run, tmp_path):
    workdir, _ = demo_run
    jobs = replan(workdir, tmp_path, lambda c: c["methods"]["ortho_init"].update(init_scale="unit"))
    chain_jobs = [(rule, w) for rule, w in jobs if rule not in REPORT_RULES]
    assert {rule for rule, _ in chain_jobs} == {"train_task", "sample_state", "score_run"}
    assert {w["method"] for _, w in chain_jobs} == {"ortho_init"}
    assert sum(rule == "train_task" for rule, _ in chain_jobs) == 2 * 3  # domains x tasks


@pytest.mark.slow
def test_adding_a_method_adds_only_its_jobs(demo_run, tmp_path):
    workdir, _ = demo_run
    jobs = replan(
        workdir, tmp_path, lambda c: c["methods"].update(ortho_rows={"method": "ortho_init", "variant": "rowspace"})
    )
    chain_jobs = [(rule, w) for rule, w in jobs if rule not in REPORT_RULES]
    assert {w["method"] for _, w in chain_jobs} == {"ortho_rows"}
    assert sum(rule == "train_task" for rule, _ in chain_jobs) == 2 * 3


@pytest.mark.slow
def test_adding_a_task_within_the_pool_adds_only_its_jobs(demo_run, tmp_path):
    """The demo's objects domain selects a pool of 4 and trains 3: num_tasks 4 keeps every task
    file, state and sample set, and adds task 4 of every run (plus the re-aggregation)."""
    workdir, _ = demo_run
    jobs = replan(workdir, tmp_path, lambda c: c["domains"]["objects"].update(num_tasks=4))
    rules = Counter(rule for rule, _ in jobs)
    assert "prepare_tasks" not in rules and "sample_base" not in rules and "embed_references" not in rules
    assert {w["domain"] for _, w in jobs if w} == {"objects"}
    methods = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())["methods"]
    assert sorted((w["method"], w["task"]) for rule, w in jobs if rule == "train_task") == sorted(
        (m, "04") for m in methods
    )
    assert {w["task"] for rule, w in jobs if rule == "sample_state"} == {"04"}
    assert rules["score_run"] == len(methods)  # the runs' score matrices grow by a row and a column


def test_num_tasks_above_the_pool_fails_the_dry_run(tmp_path):
    path = write_config(tmp_path, lambda c: c["domains"]["objects"].update(num_tasks=5, task_pool=4))
    result = snakemake("-n", "--configfile", str(path), workdir=tmp_path / "run")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "domains.objects.task_pool: 4 is smaller than num_tasks 5" in output, output[
        -2000:
    ]


@pytest.mark.slow
def test_a_revision_bump_reruns_its_stage_and_downstream_only(demo_run, tmp_path):
    workdir, _ = demo_run
    jobs = replan(workdir, tmp_path, lambda c: c.setdefault("revisions", {}).update(sampling=1))
    rules = {rule for rule, _ in jobs}
    assert "train_task" not in rules and {"sample_state", "sample_base", "score_run", "score_base"} <= rules


@pytest.mark.slow
def test_demo_rerun_has_nothing_to_do(demo_run):
    workdir, _ = demo_run
    result = snakemake("-n", "--configfile", str(ROOT / "config" / "tiny.yaml"), workdir=workdir)
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_metric_checkpoint_fails_before_any_job(tmp_path, dry_run):
    def point_at_missing(config):
        config["metrics"]["csd"] = {"checkpoint": str(tmp_path / "csd" / "checkpoint.pth")}

    result = snakemake(
        *(["-n"] if dry_run else ["--cores", "1"]),
        "--configfile",
        str(write_config(tmp_path, point_at_missing)),
        workdir=tmp_path,
    )
    assert result.returncode != 0
    assert (
        f"metrics.csd.checkpoint: '{tmp_path / 'csd' / 'checkpoint.pth'}' does not exist"
        in result.stdout + result.stderr
    )
    assert not (tmp_path / "resources").exists() and not (tmp_path / "results").exists()


def test_paper_config_without_the_csd_checkpoint_fails_the_dry_run_naming_the_key(tmp_path):
    result = snakemake("-n", "--configfile", str(ROOT / "config" / "config.yaml"), workdir=tmp_path)
    output = result.stdout + result.stderr
    assert (
        result.returncode != 0
        and "config key metrics.csd.checkpoint: 'data/csd/checkpoint.pth' does not exist" in output
    ), output[-2000:]
    # the other models are hub ids (not checked offline), so nothing else is reported
    assert "tiny_seed" not in output and "metrics.dino" not in output and "metrics.clip" not in output


def test_an_unquoted_exponent_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text((ROOT / "config" / "tiny.yaml").read_text().replace("learning_rate: 5.0e-4", "learning_rate: 5e-4"))
    result = snakemake("-n", "--configfile", str(path), workdir=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "config key training.learning_rate: '5e-4' was read as text, not a number" in output
        and "write 5.0e-4" in output
    ), output[-2000:]


@pytest.mark.slow
def test_demo_failure_of_a_bad_dataset_names_the_directory(tmp_path):
    def point_at_missing(config):
        config["domains"] = {
            "objects": {"dataset": {"layout": "dreambooth", "root": str(tmp_path / "nowhere")}, "num_tasks": 2}
        }
        config.pop("modular")
        config.pop("compositions")  # they name the modular sets and the styles

    result = snakemake("--cores", "1", "--configfile", str(write_config(tmp_path, point_at_missing)), workdir=tmp_path)
    assert result.returncode != 0
    log = (tmp_path / "logs" / "objects" / "tasks" / "order0.log").read_text()
    assert str(tmp_path / "nowhere") in log
    assert not list((tmp_path / "results").rglob("state.json"))


def test_a_run_killed_hard_leaves_a_lock_that_names_the_fix(tmp_path):
    """SIGKILL of Snakemake itself (a login node reboot, kill -9) leaves .snakemake/locks behind: the
    next run refuses to start, naming --unlock; after --unlock it runs, rerunning the incomplete job."""
    workdir = tmp_path / "run"
    target = "resources/models/tiny-sd1"
    command = [
        *SNAKEMAKE,
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "1",
        f"--configfile={ROOT / 'config' / 'tiny.yaml'}",
        target,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = workdir / ".snakemake" / "locks"
    deadline = time.monotonic() + 120
    while not (locks.is_dir() and any(locks.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "snakemake finished or never locked"
        time.sleep(0.05)
    process.kill()
    process.wait(timeout=60)
    locked = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert locked.returncode != 0
    assert "Directory cannot be locked" in locked.stderr and "--unlock" in locked.stderr, locked.stderr[-2000:]
    unlocked = subprocess.run(
        [*command[:-1], "--unlock"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert unlocked.returncode == 0, unlocked.stderr[-2000:]
    rerun = subprocess.run(
        [*command, "--rerun-incomplete"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (workdir / target / "model_index.json").is_file()


# ------------------------------------------------------------------------------ a method from outside


PLUGIN_METHOD = '''
"""A throwaway continual method: merge & init with each delta scaled by `factor`."""
from lorachain.methods import ContinualMethod, register_method
from lorachain.params import Param


@register_method
class Damped(ContinualMethod):
    name = "damped"
    param_specs = (
        Param("factor", 0.5, {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "share of each delta kept"),
    )

    def fold(self, merged, delta):
        delta = self.params["factor"] * delta
        return delta if merged is None else merged + delta
'''


def plugin_config(tmp_path: Path, **damped) -> Path:
    """The demo with one method, written in a module of its own and named under `plugins`."""
    plugin = tmp_path / "damped.py"
    plugin.write_text(PLUGIN_METHOD)

    def edit(config):
        config.update(plugins=[str(plugin)], methods={"damped": {"method": "damped", **damped}})
        config.pop("modular")
        config["compositions"].pop("stylized")  # on the modular mixed set; two subjects compose in the chain

    return write_config(tmp_path, edit)


def test_a_method_in_its_own_module_dry_runs_and_is_checked_by_its_declaration(tmp_path):
    """Adding a method touches one file, outside lorachain: the schema takes its parameters from
    the declaration, the DAG has its jobs, and a bad value fails the dry-run naming the key."""
    result = snakemake("-n", f"--configfile={plugin_config(tmp_path, factor=0.25)}", workdir=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_counts(result.stdout)
    demo = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    assert counts["train_task"] == sum(block["num_tasks"] for block in demo["domains"].values())
    bad = snakemake("-n", f"--configfile={plugin_config(tmp_path, factor=2)}", workdir=tmp_path)
    assert bad.returncode != 0 and "factor" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_a_method_in_its_own_module_trains_through_the_workflow(tmp_path):
    """The job processes load the plugin too: task 1 of the plugin's run is trained and its state
    records the plugin method with the parameter the config gave."""
    target = "results/objects/damped/order0-seed0/task01/state.json"
    result = snakemake("--cores", "2", f"--configfile={plugin_config(tmp_path, factor=0.25)}", target, workdir=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((tmp_path / target).read_text())
    assert manifest["method"] == {"name": "damped", "params": {"factor": 0.25}}
