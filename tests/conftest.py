"""Shared fixtures: tiny SD1 / SDXL / SD3 / FLUX pipelines saved to disk, and synthetic 64 px training images.

Everything runs offline on a CPU: the tiny pipelines are built from config with seeded random
weights (lorachain.models.tiny) and the images are written by lorachain.data's generator.
"""

from __future__ import annotations

import os
import threading

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
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusion3Pipeline (SD3.5-like MMDiT, two CLIPs and a T5) written by save_pretrained."""
    from lorachain.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd3", tmp_path_factory.mktemp("tiny") / "sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A tiny FluxPipeline (FLUX.1-dev-like, with the guidance embedding) written by save_pretrained."""
    from lorachain.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory) -> Path:
    """A tiny FluxPipeline of FLUX.1-schnell's kind (no guidance embedding) written by save_pretrained."""
    from lorachain.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("flux_schnell", tmp_path_factory.mktemp("tiny") / "flux_schnell", seed=0)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Root of a DreamBooth-layout synthetic dataset: 3 subjects x 3 JPEGs of 64 px."""
    from lorachain.data import generate_dreambooth_like

    return generate_dreambooth_like(
        tmp_path_factory.mktemp("data") / "dreambooth",
        subjects=SYNTHETIC_SUBJECTS,
        images_per_subject=3,
        size=64,
        seed=0,
    )


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
# run end to end through profiles/local (test_rehearsal.py) and through profiles/slurm-ci on the
# local test cluster (test_slurm.py), one after the other (run side by side on 2 cores they took
# 20 min against 17 one after the other: every job is mostly imports, which need the CPU).
# The SLURM run asks for one domain's results in both regimes (SLURM_DOMAIN): that is every rule,
# and every job kind, of the full DAG (the second domain adds jobs of the same rules, and a SLURM
# job costs twice a local one: the plugin's job step starts Snakemake twice before the script).
SLURM_DOMAIN = "objects"

ROOT = Path(__file__).resolve().parents[1]
REAL_DREAMBOOTH = Path(os.environ.get("LORACHAIN_DREAMBOOTH", ROOT.parent / "shared" / "data" / "dreambooth"))
REHEARSAL_TIMEOUT = 2400  # seconds; the SLURM run is under `timeout -k 30` too (a lost job must not hang CI)

REQUIRE_SLURM = os.environ.get("LORACHAIN_REQUIRE_SLURM") == "1"
SLURM_ALREADY_RUNNING = os.environ.get("LORACHAIN_SLURM_RUNNING") == "1"
SLURM_STATE = Path(os.environ.get("LORACHAIN_SLURM_STATE", "/var/tmp/lorachain-slurm"))


def snakemake_command(*args: str, workdir: Path) -> list[str]:
    import sys

    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        *args,
    ]


def slurm_env() -> dict[str, str]:
    """SLURM jobs run the submitting interpreter and inherit PATH (--export=ALL): venv first."""
    import sys

    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:{os.environ.get('PATH', '')}",
    }


def slurm_unavailable() -> str | None:
    """Why this machine cannot run the test cluster (None: it can)."""
    import shutil

    if SLURM_ALREADY_RUNNING:
        return None if shutil.which("sbatch") else "LORACHAIN_SLURM_RUNNING=1 but sbatch is not on PATH"
    if shutil.which("sbatch") is None and not REQUIRE_SLURM:
        return "SLURM is not installed (sbatch not on PATH); LORACHAIN_REQUIRE_SLURM=1 installs a local test cluster"
    if os.geteuid() != 0:
        return "ci/slurm/start.sh needs root (set LORACHAIN_SLURM_RUNNING=1 to use a running test cluster)"
    if shutil.which("apt-get") is None and shutil.which("sbatch") is None:
        return "no sbatch and no apt-get to install SLURM with"
    return None


def skip_without_slurm() -> None:
    """Skip (or, with LORACHAIN_REQUIRE_SLURM=1 or LORACHAIN_SLURM_RUNNING=1, fail)."""
    if (reason := slurm_unavailable()) is not None:
        if REQUIRE_SLURM or SLURM_ALREADY_RUNNING:
            pytest.fail(f"the SLURM test cluster is required: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local test cluster (ci/slurm/start.sh), up for the session; a lock file serialises
    concurrent sessions. Stopped afterwards unless LORACHAIN_SLURM_RUNNING=1."""
    import fcntl
    import shutil
    import subprocess
    import time

    skip_without_slurm()
    SLURM_STATE.parent.mkdir(parents=True, exist_ok=True)
    with open(SLURM_STATE.parent / "lorachain-slurm.lock", "w") as lock:
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another session holds the SLURM test cluster lock")
                time.sleep(2)
        started = time.monotonic()
        if not SLURM_ALREADY_RUNNING:
            result = subprocess.run(
                ["bash", str(ROOT / "ci" / "slurm" / "start.sh")], capture_output=True, text=True, timeout=900
            )
            if result.returncode != 0:
                subprocess.run(
                    ["bash", str(ROOT / "ci" / "slurm" / "stop.sh")], capture_output=True, text=True, timeout=300
                )
                pytest.fail(
                    f"ci/slurm/start.sh failed ({result.returncode}):\n{result.stdout[-5000:]}\n{result.stderr[-5000:]}"
                )
        assert shutil.which("sbatch", path=slurm_env()["PATH"]), "sbatch not on PATH after ci/slurm/start.sh"
        start_seconds = time.monotonic() - started
        try:
            yield {"start_seconds": start_seconds}
        finally:
            if not SLURM_ALREADY_RUNNING:
                stopped = time.monotonic()
                result = subprocess.run(
                    ["bash", str(ROOT / "ci" / "slurm" / "stop.sh")], capture_output=True, text=True, timeout=300
                )
                print(f"\nci/slurm/stop.sh: rc {result.returncode}, {time.monotonic() - stopped:.1f} s")
                assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


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


class _Run:
    """A Snakemake run in the background: its output goes to a file (a full pipe would stall it)."""

    def __init__(self, name: str, command: list[str], env: dict, workdir: Path):
        import subprocess
        import time

        self.name, self.workdir = name, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.output_file = workdir.parent / f"{workdir.name}.snakemake.log"
        self.started = time.time()
        with open(self.output_file, "w") as handle:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        self.ended = None
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        import subprocess
        import time

        try:
            self.process.wait(timeout=REHEARSAL_TIMEOUT + 120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.ended = time.time()

    def wait(self) -> dict:
        self.watcher.join()
        output = self.output_file.read_text()
        return {
            "returncode": self.process.returncode,
            "output": output,
            "started": self.started,
            "wall": self.ended - self.started,
        }


@pytest.fixture(scope="session")
def rehearsal_runs(rehearsal_setup, request) -> dict:
    """The rehearsal through profiles/local (PYTHONHASHSEED=1), then, when the session runs the
    SLURM tests and the cluster is available, through profiles/slurm-ci (PYTHONHASHSEED=2), each
    down to its report. Returns {"local": ..., "slurm": ... or None}."""
    import subprocess

    config = f"--configfile={rehearsal_setup['path']}"
    root = rehearsal_setup["root"]
    results = {"local": None, "slurm": None}
    for name in ("local", "slurm"):
        if name == "local":
            command = snakemake_command(
                "--profile", str(ROOT / "profiles" / "local"), "--resources", "gpu=2", config, workdir=root / name
            )
            env, cluster = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "1"}, None
        else:
            if (
                not any("slurm_run" in item.fixturenames for item in request.session.items)
                or slurm_unavailable() is not None
            ):
                break
            cluster = request.getfixturevalue("slurm_cluster")
            command = [
                "timeout",
                "-k",
                "30",
                str(REHEARSAL_TIMEOUT),
                *snakemake_command(
                    *slurm_targets(rehearsal_setup["config"]),
                    "--profile",
                    str(ROOT / "profiles" / "slurm-ci"),
                    config,
                    workdir=root / name,
                ),
            ]
            env = {**slurm_env(), "PYTHONHASHSEED": "2"}
        result = _Run(name, command, env, root / name).wait()
        assert result["returncode"] == 0, (
            f"the {name} rehearsal failed ({result['returncode']}):\n{result['output'][-8000:]}"
        )
        results[name] = {**rehearsal_setup, **result, "workdir": root / name, "cluster": cluster}
        print(f"\nrehearsal through {name}: {result['wall']:.0f} s")
        if name == "slurm":  # a partial DAG; the report (a local command, not a job) is the local run's
            continue
        report = subprocess.run(
            snakemake_command("--report", "results/report.html", config, workdir=root / name),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert report.returncode == 0, report.stderr[-3000:]
    return results


def slurm_targets(config: dict) -> list[str]:
    """What the SLURM rehearsal asks for: SLURM_DOMAIN's continual and modular results."""
    from lorachain.plan import domain_outputs, modular_domains, modular_outputs

    assert SLURM_DOMAIN in modular_domains(config), "the SLURM rehearsal needs a domain of both regimes"
    return domain_outputs(config, SLURM_DOMAIN) + modular_outputs(config, SLURM_DOMAIN)


@pytest.fixture(scope="session")
def rehearsal_run(rehearsal_runs) -> dict:
    """The rehearsal through profiles/local (see rehearsal_runs)."""
    return rehearsal_runs["local"]


# ------------------------------------------------------------------------- the miniature world
# The world of config/demo.yaml, built by the workflow's own rules (pipeline, DINO, CLIP, CSD: about
# 7 minutes on 2 cores), once per session. LORACHAIN_WORLD names a directory those rules built
# (resources/world of a demo run) to reuse instead; it must belong to the same world.
WORLD_PARTS = ("pipeline", "dino", "clip")  # directories with a built marker
WORLD_FILES = ("csd/checkpoint.pth",)  # the published CSD checkpoint layout: a file, no marker


@pytest.fixture(scope="session")
def pretrained_world(tmp_path_factory) -> Path:
    import json
    import subprocess

    import yaml

    from lorachain.files import BUILT_MARKER
    from lorachain.world.ids import world_id

    config_file = ROOT / "config" / "demo.yaml"
    expected = world_id(yaml.safe_load(config_file.read_text())["world"])
    if os.environ.get("LORACHAIN_WORLD"):
        world = Path(os.environ["LORACHAIN_WORLD"])
    else:
        workdir = tmp_path_factory.mktemp("world")
        targets = [f"resources/world/{part}" for part in WORLD_PARTS + WORLD_FILES]
        command = snakemake_command(
            *targets,
            "--profile",
            str(ROOT / "profiles" / "local"),
            "--resources",
            "gpu=2",
            f"--configfile={config_file}",
            workdir=workdir,
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        world = workdir / "resources" / "world"
    for part in WORLD_PARTS:
        found = json.loads((world / part / BUILT_MARKER).read_text())["world"]
        assert found == expected, f"{world / part}: built for world {found}, config/demo.yaml is {expected}"
    for part in WORLD_FILES:
        assert (world / part).is_file(), f"{world / part}: missing (the world's CSD rule builds it)"
    return world
