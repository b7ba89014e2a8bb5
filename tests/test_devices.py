"""The GPU slot pool (lorachain.devices), checked without a GPU: real processes taking real flocks."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lorachain.devices import LOCK_DIR_VARIABLE, POOL_VARIABLE, VISIBLE, DeviceError, gpu_slots, lock_dir, slot_locks

# A job: take one slot, write what CUDA_VISIBLE_DEVICES became, then hold it until `release`
# exists; with "fail", raise inside the slot instead.
JOB = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lorachain.devices import gpu_slots

    out, release, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    with gpu_slots(1) as visible:
        out.write_text(str(visible))
        if mode == "fail":
            raise RuntimeError("the job failed")
        while not release.exists():
            time.sleep(0.05)
    """
)


@pytest.fixture
def pool(tmp_path, monkeypatch):
    """A pool of the given device ids with its own lock directory; no scheduler's choice set."""

    def make(devices: str) -> dict:
        env = {**os.environ, POOL_VARIABLE: devices, LOCK_DIR_VARIABLE: str(tmp_path / "locks")}
        env.pop(VISIBLE, None)
        for name, value in ((POOL_VARIABLE, devices), (LOCK_DIR_VARIABLE, str(tmp_path / "locks"))):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv(VISIBLE, raising=False)
        return env

    return make


def start(env: dict, out: Path, release: Path, mode: str = "hold") -> subprocess.Popen:
    command = [sys.executable, "-c", JOB, str(out), str(release), mode]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    time.sleep(0.05)  # written in one call, but let it land
    return path.read_text()


def test_concurrent_jobs_get_distinct_devices_and_a_waiting_job_gets_the_freed_one(tmp_path, pool):
    env = pool("0,1,2")
    release = tmp_path / "release"
    jobs = [start(env, tmp_path / f"out{i}", release) for i in range(3)]
    assert sorted(wait_for(tmp_path / f"out{i}") for i in range(3)) == ["0", "1", "2"]
    late = start(env, tmp_path / "late", tmp_path / "late-release")
    time.sleep(1.5)
    assert not (tmp_path / "late").exists(), "a fourth job ran while all three slots were held"
    release.touch()
    for job in jobs:
        assert job.wait(timeout=60) == 0, job.stdout.read()
    assert wait_for(tmp_path / "late") in {"0", "1", "2"}
    (tmp_path / "late-release").touch()
    assert late.wait(timeout=60) == 0


def test_a_slot_is_released_when_its_job_fails_or_is_killed(tmp_path, pool):
    env = pool("0")
    failed = start(env, tmp_path / "failed", tmp_path / "never", mode="fail")
    assert failed.wait(timeout=60) != 0 and "the job failed" in failed.stdout.read()
    killed = start(env, tmp_path / "killed", tmp_path / "never")
    assert wait_for(tmp_path / "killed") == "0"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    after = start(env, tmp_path / "after", tmp_path / "release")
    assert wait_for(tmp_path / "after", timeout=30) == "0"
    (tmp_path / "release").touch()
    assert after.wait(timeout=60) == 0


def test_in_process_slot_is_released_and_the_variable_removed_on_an_exception(pool):
    pool("0")
    with pytest.raises(RuntimeError), gpu_slots(1) as visible:
        assert visible == "0" and os.environ[VISIBLE] == "0"
        raise RuntimeError("job failed")
    assert VISIBLE not in os.environ
    (lock,) = slot_locks(["0"], lock_dir())
    with open(lock) as handle:  # free again: raises BlockingIOError while another handle holds it
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_schedulers_cuda_visible_devices_is_kept(tmp_path, pool, monkeypatch):
    pool("0,1")
    monkeypatch.setenv(VISIBLE, "3")
    with gpu_slots(1) as visible:
        assert visible == "3" and os.environ[VISIBLE] == "3"
    assert os.environ[VISIBLE] == "3"
    assert not (tmp_path / "locks").exists()  # no slot taken


def test_no_gpu_requested_or_none_present_sets_nothing(pool, monkeypatch):
    import lorachain.devices as devices

    pool("0")
    with gpu_slots(0) as visible:
        assert visible is None and VISIBLE not in os.environ
    monkeypatch.delenv(POOL_VARIABLE)
    monkeypatch.setattr(devices, "_NVIDIA_GPUS", Path("/nonexistent/nvidia/gpus"))
    with gpu_slots(1) as visible:
        assert visible is None and VISIBLE not in os.environ


def test_two_slots_for_one_job_and_a_shared_device(tmp_path, pool):
    env = pool("0,0,1")
    with gpu_slots(2) as first:
        assert first == "0,0"  # device 0's two slots
        other = start(env, tmp_path / "other", tmp_path / "release")
        assert wait_for(tmp_path / "other") == "1"
        (tmp_path / "release").touch()
        assert other.wait(timeout=60) == 0


def test_bad_settings_are_named(pool):
    pool("0,,1")
    with pytest.raises(DeviceError, match=f"{POOL_VARIABLE}='0,,1'"):
        gpu_slots(1).__enter__()
    pool("0")
    with pytest.raises(DeviceError, match="requests gpu=2 but the pool has 1 device"):
        gpu_slots(2).__enter__()


def test_run_job_pins_a_gpu_job_to_its_slot(tmp_path, pool):
    from snakemake.iocontainers import Namedlist

    from lorachain.workflow_io import run_job

    pool("5")

    def named(**items):
        section = Namedlist(list(items.values()))
        for name, index in zip(items, range(len(items))):
            section._set_name(name, index)
        return section

    class Script:
        rule = "train_task"
        threads = 1
        config: dict = {}
        log = [str(tmp_path / "job.log")]
        input, output = named(), named()
        params = named(key=VISIBLE)  # the entry point below: os.getenv(key=...)
        resources = named(gpu=1)

    run_job(Script(), "os:getenv")
    log = (tmp_path / "job.log").read_text()
    assert '"5"' in log and "GPU slot(s) [0]: CUDA_VISIBLE_DEVICES=5" in log
    assert VISIBLE not in os.environ


SNAKEFILE = """
rule all:
    input: expand("out{i}.txt", i=range(3))

rule job:
    output: "out{i}.txt"
    log: "logs/{i}.log"
    resources: gpu=1
    script: "job.py"
"""

# The job holds its slot until all three hold theirs (so they provably ran together); its output
# is the device it saw.
SCRIPT = """
import os, sys, time
from pathlib import Path
from lorachain.workflow_io import run_job

def hold():
    Path("started", str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(Path("started").iterdir())) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.environ.get("CUDA_VISIBLE_DEVICES")

sys.modules["gpu_job"] = sys.modules[__name__]
run_job(snakemake, "gpu_job:hold")
Path(snakemake.output[0]).write_text(Path(snakemake.log[0]).read_text())
"""


def test_snakemake_jobs_run_together_each_on_its_own_device(tmp_path, pool):
    """A real Snakemake run of three gpu=1 jobs at once (--resources gpu=3) through run_job."""
    env = pool("0,1,2")
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "job.py").write_text(SCRIPT)
    (tmp_path / "started").mkdir()
    command = [sys.executable, "-m", "snakemake", "--cores", "3", "--resources", "gpu=3", "--quiet"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = [(tmp_path / f"out{i}.txt").read_text() for i in range(3)]
    assert sorted(text.rsplit("\n", 2)[-2] for text in seen) == ['"0"', '"1"', '"2"']
