"""The paper's path on diffusion transformers: config/config.yaml with its commented SD3.5-medium or
FLUX.1-dev block applied (lorachain.rehearsal.config_block, with_block), the model a tiny stand-in
of the same pipeline class written by save_pretrained, and only models, dataset roots and sizes
substituted (as for the SDXL rehearsal, test_rehearsal.py). The end-to-end runs (slow) go through
profiles/local and ask for the objects domain's results in both regimes (domain_targets): every
rule kind of the full DAG at about half its jobs."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REAL_DREAMBOOTH, ROOT, snakemake_command
from test_workflow import job_counts

from lorachain.config_checks import ConfigError, check_config
from lorachain.rehearsal import (
    allowed,
    block_names,
    build_stand_ins,
    config_block,
    domain_targets,
    rehearsal_config,
    substituted_keys,
    with_block,
)

PAPER_FILE = ROOT / "config" / "config.yaml"
PIPELINES = {"sd3.5-medium": "StableDiffusion3Pipeline", "flux.1-dev": "FluxPipeline"}
DOMAIN = "objects"  # the domain whose results in both regimes the end-to-end runs ask for
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
GPUS = ("--resources", "gpu=2")  # two jobs at once on the 2 cores (every GPU rule asks for gpu=1)
# Modular entries of the paper config that need a U-Net; the dry-run refuses them on a transformer.
UNET_ONLY = {"adapters": {"ed_lora"}, "merges": {"mos_weighted_average", "gradient_fusion_mos"}}


def _paper() -> tuple[str, dict]:
    text = PAPER_FILE.read_text()
    return text, yaml.safe_load(text)


# --------------------------------------------------------------------------- blocks, unit level
SAMPLE = """model:
  pretrained: base/model
  vae: base/vae
training:
  rank: 64
  optimizer: {name: adamw8bit, betas: [0.9, 0.999]}
  steps: 10
# >>> small: a test block; to use it, ...
# model:
#   pretrained: other/model
# # a comment of the block
# training:
#   optimizer: {name: adamw}
#   steps: 5
# <<< small
# >>> keep-vae
# training:
#   rank: 4
# <<< keep-vae
"""


def test_a_block_is_parsed_and_replaces_the_keys_it_names_whole():
    paper = yaml.safe_load(SAMPLE)
    block = config_block(SAMPLE, "small")
    assert block == {"model": {"pretrained": "other/model"}, "training": {"optimizer": {"name": "adamw"}, "steps": 5}}
    assert block_names(SAMPLE) == ["small", "keep-vae"]
    config = with_block(paper, block)
    # the optimizer is the block's whole (no betas left over from the paper's), rank stays, the VAE goes
    assert config == {
        "model": {"pretrained": "other/model"},
        "training": {"rank": 64, "optimizer": {"name": "adamw"}, "steps": 5},
    }
    assert paper["model"]["vae"] == "base/vae" and paper["training"]["steps"] == 10  # not modified
    kept = with_block(paper, config_block(SAMPLE, "keep-vae"))
    assert kept["model"] == paper["model"] and kept["training"]["rank"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SAMPLE, "config/config.yaml: no block '# >>> absent' (the blocks there: small, keep-vae)"),
        ("# >>> absent\n# model:\n#   pretrained: x\n", "has no end line '# <<< absent'"),
        ("# >>> absent\n# model: [\n# <<< absent\n", "is not valid YAML once uncommented"),
        ("# >>> absent\nmodel:\n# <<< absent\n", "config/config.yaml:2: a line of the block '# >>> absent' must start"),
        ("# >>> absent\n# rank: 4\n# <<< absent\n", "must hold top-level sections of keys"),
    ],
)
def test_a_missing_or_broken_block_is_an_error_naming_the_file_and_the_marker(text, message):
    with pytest.raises(ConfigError) as error:
        config_block(text, "absent")
    assert message in str(error.value) and "config/config.yaml" in str(error.value)


# ------------------------------------------------------------------------ the block rehearsals
@pytest.fixture(scope="module", params=sorted(PIPELINES))
def block_setup(request, tmp_path_factory) -> dict:
    """Stand-ins for the paper config with one block applied, and its rehearsal config."""
    if not (REAL_DREAMBOOTH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"the real DreamBooth dataset is absent ({REAL_DREAMBOOTH}; set LORACHAIN_DREAMBOOTH)")
    name = request.param
    root = tmp_path_factory.mktemp(name)
    text, paper = _paper()
    block = config_block(text, name)
    applied = with_block(paper, block)
    stand_ins = build_stand_ins(root / "stand-ins", applied)
    config = rehearsal_config(applied, stand_ins, REAL_DREAMBOOTH)
    path = root / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"name": name, "block": block, "applied": applied, "config": config, "path": path, "root": root}


def test_a_block_rehearsal_substitutes_only_models_roots_and_sizes(block_setup):
    from lorachain.files import BUILT_MARKER

    block, applied, config = block_setup["block"], block_setup["applied"], block_setup["config"]
    changed = substituted_keys(applied, config)
    assert changed and all(allowed(key) for key in changed), sorted(key for key in changed if not allowed(key))
    assert "vae" not in config["model"] and "tiny" not in config["model"]
    # the block's training and sampling choices stay (guidance, targets, flow matching, checkpointing)
    for key in ("target_modules", "flow_matching", "gradient_checkpointing", "learning_rate"):
        assert config["training"][key] == block["training"][key], key
    assert config["training"].get("guidance") == block["training"].get("guidance")
    assert config["sampling"]["guidance_scale"] == block["sampling"]["guidance_scale"]
    assert config["modular"]["adapters"] == block["modular"]["adapters"]
    assert config["modular"]["merges"] == block["modular"]["merges"]
    assert config["methods"] == applied["methods"] and config["export"]["formats"] == ["diffusers"]
    # the model is a stand-in of the named pipeline class, as a download would be: no tiny-build marker
    model = Path(config["model"]["pretrained"])
    assert model.is_absolute() and not (model / BUILT_MARKER).exists()
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == PIPELINES[block_setup["name"]]
    transformer = json.loads((model / "transformer" / "config.json").read_text())
    assert transformer.get("guidance_embeds", False) == (block_setup["name"] == "flux.1-dev")
    check_config(config)


def test_the_block_keeps_the_papers_modular_grid_less_exactly_what_a_transformer_refuses(block_setup):
    """The block's adapters and merges are the paper's less UNET_ONLY, and UNET_ONLY is what the
    dry-run refuses: the rehearsal with the paper's modular section in place of the block's is
    refused for exactly those entries (the block's own passes: see the test above)."""
    text, paper = _paper()
    block = block_setup["block"]
    for kind, refused in UNET_ONLY.items():
        kept = {label: entry for label, entry in paper["modular"][kind].items() if label not in refused}
        assert block["modular"][kind] == kept, kind
    config = copy.deepcopy(block_setup["config"])
    config["modular"].update({kind: paper["modular"][kind] for kind in UNET_ONLY})
    with pytest.raises(ConfigError) as error:
        check_config(config)
    keys = {line.split(":")[0].removeprefix("config key ") for line in str(error.value).splitlines()}
    assert keys == {"modular.adapters.ed_lora.embeddings", "modular.merges.gradient_fusion_mos.cross_attention_rows"}


def test_a_block_rehearsal_dry_runs_and_its_targets_cover_every_rule_of_the_full_dag(block_setup):
    config, path = block_setup["config"], block_setup["path"]
    workdir = block_setup["root"] / "dry"

    def dry_run(*targets: str) -> dict[str, int]:
        result = subprocess.run(
            snakemake_command("-n", *targets, f"--configfile={path}", workdir=workdir),
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return job_counts(result.stdout)

    full = dry_run()
    adapters, merges = len(config["modular"]["adapters"]), len(config["modular"]["merges"])
    assert full["train_task"] == len(config["methods"]) * 2 * 2 and "build_tiny_model" not in full
    assert full["train_concept"] == adapters * (2 + 2)  # 2 objects; the mixed set's object and style
    assert full["merge_and_sample"] == merges * 2
    reduced = dry_run(*domain_targets(config, DOMAIN))
    assert set(full) - set(reduced) == {"prepare_mix", "provenance_table", "all"}, set(full) - set(reduced)
    assert reduced["train_task"] == len(config["methods"]) * 2 and reduced["merge_and_sample"] == merges
    assert reduced["total"] <= full["total"] // 2 + 1, (reduced["total"], full["total"])


def test_the_rehearsal_command_writes_a_block_rehearsal(tmp_path):
    if not (REAL_DREAMBOOTH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"the real DreamBooth dataset is absent ({REAL_DREAMBOOTH})")
    command = [sys.executable, "-m", "lorachain.cli", "rehearsal", "--dreambooth", str(REAL_DREAMBOOTH)]
    command += ["--paper", str(PAPER_FILE)]
    written = subprocess.run(
        [*command, str(tmp_path), "--block", "flux.1-dev"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert written.returncode == 0, written.stderr[-3000:]
    assert f"--configfile={tmp_path / 'config.yaml'} --directory {tmp_path}" in written.stdout
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    model = Path(config["model"]["pretrained"])
    assert model.parent == tmp_path / "stand-ins" and config["training"]["guidance"] == 1.0
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    missing = subprocess.run(
        [*command, str(tmp_path / "again"), "--block", "sd4"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 2 and f"{PAPER_FILE}: no block '# >>> sd4'" in missing.stderr, missing.stderr
    assert not (tmp_path / "again").exists()


# ----------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def block_run(block_setup) -> dict:
    """The block's rehearsal through profiles/local, the objects domain's results in both regimes,
    and its report."""
    config = f"--configfile={block_setup['path']}"
    workdir = block_setup["root"] / "local"
    targets = domain_targets(block_setup["config"], DOMAIN)
    env = {**ENV, "PYTHONHASHSEED": "1"}
    started = time.time()
    result = subprocess.run(
        snakemake_command(*targets, "--profile", str(ROOT / "profiles" / "local"), *GPUS, config, workdir=workdir),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    wall = time.time() - started
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    counts = job_counts(result.stdout + result.stderr)
    print(f"\n{block_setup['name']} rehearsal through local: {wall:.0f} s, {counts['total']} jobs")
    report = subprocess.run(
        snakemake_command("--report", "results/report.html", *targets, config, workdir=workdir),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    return {**block_setup, "workdir": workdir, "wall": wall, "counts": counts}


def _lora_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.slow
def test_a_block_rehearsal_writes_the_tables_and_the_report(block_run):
    workdir, config = block_run["workdir"], block_run["config"]
    tables = workdir / "results" / "tables"
    table = pd.read_csv(tables / f"{DOMAIN}.csv")
    assert sorted(set(table["method"])) == sorted(config["methods"])
    composed = table["metric"].str.contains(": ")  # a composition's rows: F_ref is not defined for them
    numbers = table.drop(columns=["domain", "method", "metric"]).select_dtypes("number")
    assert numbers[~composed].map(math.isfinite).all().all(), table
    modular = pd.read_csv(tables / f"{DOMAIN}-modular.csv")
    assert list(modular["merge"]) == list(config["modular"]["merges"])
    assert modular[["image_alignment", "text_alignment", "average"]].map(math.isfinite).all().all(), modular
    html = (workdir / "results" / "report.html").read_text()
    for name in (f"{DOMAIN}.csv", f"{DOMAIN}-modular.csv", "grid.png"):
        assert name in html, name


@pytest.mark.slow
def test_a_block_rehearsal_trains_the_transformer_of_the_stand_in(block_run):
    """Every state (each continual method's tasks, each adapter's concepts) records the transformer
    pipeline and holds transformer.* LoRA factors of both streams' projections."""
    workdir, config = block_run["workdir"], block_run["config"]
    states = sorted((workdir / "results" / DOMAIN).glob("**/state.json"))
    kinds = {state.parent.parent.name if "modular" in state.parts else state.parents[2].name for state in states}
    assert set(config["methods"]) | set(config["modular"]["adapters"]) <= kinds, kinds
    for state_file in states:
        state = json.loads(state_file.read_text())
        assert state["architecture"] == PIPELINES[block_run["name"]], state_file
        assert state["base_model"] == config["model"]["pretrained"]
        keys = _lora_keys(state_file.parent / state["lora_file"])
        assert keys and all(key.startswith("transformer.") for key in keys), (state_file, keys[:3])
        assert any(".add_q_proj." in key for key in keys) and any(".to_add_out." in key for key in keys)
    assert not (workdir / "resources").exists()  # nothing was built: the model came from its path
    print(f"\n{block_run['name']}: {block_run['wall']:.0f} s, jobs {block_run['counts']}")


@pytest.mark.slow
def test_a_block_rehearsal_exports_diffusers_files_that_load_in_the_stock_pipeline(block_run, tmp_path):
    """The export rules on a copy of the run: the objects domain's final states (every continual
    method) and a merge of each merge method (exports differ by method: exact or by SVD) as
    diffusers files keyed transformer.*, which the stand-in's stock pipeline loads with
    load_lora_weights."""
    import diffusers

    from lorachain.export import DIFFUSERS_FILE, KOHYA_FILE, RECORD_FILE
    from lorachain.plan import export_outputs

    workdir, config = tmp_path / "run", block_run["config"]
    shutil.copytree(block_run["workdir"], workdir, symlinks=True)
    merges = config["modular"]["merges"]
    first_of_method = {block["method"]: label for label, block in reversed(merges.items())}
    exports = [
        path
        for path in export_outputs(config)
        if path.startswith(f"results/{DOMAIN}/")
        and ("/modular/" not in path or any(f"/{label}/" in path for label in first_of_method.values()))
    ]
    result = subprocess.run(
        snakemake_command(
            *exports,
            "--profile",
            str(ROOT / "profiles" / "local"),
            *GPUS,
            f"--configfile={block_run['path']}",
            workdir=workdir,
        ),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    counts = job_counts(result.stdout + result.stderr)
    assert counts["total"] == len(exports) == len(config["methods"]) + len(first_of_method), counts
    pipe = getattr(diffusers, PIPELINES[block_run["name"]]).from_pretrained(config["model"]["pretrained"])
    for index, export in enumerate(exports):
        directory = workdir / export
        assert (directory / RECORD_FILE).is_file() and not (directory / KOHYA_FILE).exists(), export
        keys = _lora_keys(directory / DIFFUSERS_FILE)
        assert keys and all(key.startswith("transformer.") for key in keys), (export, keys[:3])
        pipe.load_lora_weights(str(directory), adapter_name=f"export{index}")
    assert len(pipe.transformer.peft_config) == len(exports)
