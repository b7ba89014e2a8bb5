"""Shared fixtures: tiny SD1 / SDXL pipelines saved to disk, and synthetic 64 px training images.

Everything runs offline on a CPU: the tiny pipelines are built from config with seeded random
weights (lorachain.models.tiny) and the images are written by lorachain.data's generator.
"""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub / transformers / diffusers: no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Three DreamBooth-like subjects: one per task of the short chains in the tests.
SYNTHETIC_SUBJECTS = {"backpack": "backpack", "teapot": "teapot", "colorful_sneaker": "sneaker"}


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline written by save_pretrained (safetensors, fp32)."""
    from lorachain.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd1", tmp_path_factory.mktemp("tiny") / "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLPipeline written by save_pretrained (safetensors, fp32)."""
    from lorachain.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Root of a DreamBooth-layout synthetic dataset: 3 subjects x 3 JPEGs of 64 px."""
    from lorachain.data import generate_dreambooth_like

    return generate_dreambooth_like(tmp_path_factory.mktemp("data") / "dreambooth", subjects=SYNTHETIC_SUBJECTS, images_per_subject=3, size=64, seed=0)


@pytest.fixture(scope="session")
def synthetic_tasks(synthetic_dataset) -> list[tuple[str, list[str]]]:
    """(train prompt, image paths) of one task per synthetic subject, in a fixed order."""
    return [
        (f"a photo of sks {class_name}", sorted(str(p) for p in (synthetic_dataset / subject).glob("*.jpg")))
        for subject, class_name in SYNTHETIC_SUBJECTS.items()
    ]


@pytest.fixture(scope="session")
def synthetic_images(synthetic_tasks) -> list[str]:
    """A few 64 px JPEG paths (the first subject's images)."""
    return synthetic_tasks[0][1]


# ------------------------------------------------------------------------------- the rehearsal
# config/config.yaml with only models, dataset roots and sizes substituted (lorachain.rehearsal),
# run end to end through profiles/local here and through profiles/slurm-ci in test_slurm.py.

ROOT = Path(__file__).resolve().parents[1]
REAL_DREAMBOOTH = Path(os.environ.get("LORACHAIN_DREAMBOOTH", ROOT.parent / "shared" / "data" / "dreambooth"))
REHEARSAL_TIMEOUT = 1500  # seconds


def snakemake_command(*args: str, workdir: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), *args]


@pytest.fixture(scope="session")
def rehearsal_setup(tmp_path_factory) -> dict:
    """Stand-ins for every model of config/config.yaml, and the rehearsal config that names them."""
    import yaml

    from lorachain.rehearsal import build_stand_ins, rehearsal_config

    if not (REAL_DREAMBOOTH / "prompts_and_classes.txt").is_file():
        pytest.skip(f"the real DreamBooth dataset is absent ({REAL_DREAMBOOTH}; set LORACHAIN_DREAMBOOTH)")
    root = tmp_path_factory.mktemp("rehearsal")
    paper = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    stand_ins = build_stand_ins(root / "stand-ins", paper)
    config = rehearsal_config(paper, stand_ins, REAL_DREAMBOOTH)
    path = root / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"paper": paper, "config": config, "path": path, "stand_ins": stand_ins, "root": root}


@pytest.fixture(scope="session")
def rehearsal_run(rehearsal_setup) -> dict:
    """The rehearsal through profiles/local to its tables, modular table and report (jobs hash with
    PYTHONHASHSEED=1; test_slurm.py's run uses 2 and compares the bytes)."""
    import subprocess
    import time

    workdir = rehearsal_setup["root"] / "local"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "1"}
    config = f"--configfile={rehearsal_setup['path']}"
    started = time.monotonic()
    run = subprocess.run(
        snakemake_command("--profile", str(ROOT / "profiles" / "local"), "--resources", "gpu=2", config, workdir=workdir),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=REHEARSAL_TIMEOUT,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-6000:]
    report = subprocess.run(snakemake_command("--report", "results/report.html", config, workdir=workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    seconds = time.monotonic() - started
    print(f"\nrehearsal through profiles/local: {seconds:.0f} s")
    return {**rehearsal_setup, "workdir": workdir, "output": run.stdout + run.stderr, "seconds": seconds}
