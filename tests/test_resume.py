"""In-task checkpoints: a training job killed mid-task (SLURM preemption or walltime, a Snakemake
retry) resumes from ``<task dir>/.resume/`` and ends bit-identical to an uninterrupted run.

All runs train task 1 (and one task 2) of the tiny SD1 pipeline for 12 steps with a checkpoint every
4 steps. Interruptions are real: SIGTERM sent to a training subprocess, SIGTERM sent by the process
to itself in the middle of a step, and an exception thrown mid-step (a crash that leaves only the
periodic checkpoint behind).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorachain.state import LORA_FILE, STATE_FILE
from lorachain.torch_env import torch
from lorachain.train import (
    CHECKPOINT_FILE,
    RESUME_DIR,
    TrainingConfig,
    TrainingError,
    TrainingInterrupted,
    deferred_sigterm,
    train_task,
)
from lorachain.train import read_checkpoint as read_checkpoint_file

STEPS, EVERY = 12, 4
TRAINING = dict(
    rank=4, lora_alpha=8, steps=STEPS, learning_rate=1e-3, resolution=64, batch_size=2, checkpoint_every=EVERY
)
METHOD = "merge_init"
LOSS_LOG = "losses.csv"
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training jobs run with one thread (the rule's `threads: 1`); so do these runs, the subprocess
    included: bit-identity holds for a fixed thread count, and on a busy 2-CPU machine one thread is
    also far faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def call_kwargs(base, tasks, output_dir, *, index=1, previous=None, seed=0, **training):
    prompt, images = tasks[index - 1]
    output_dir = Path(output_dir)
    return dict(
        model_source=str(base),
        train_images=images,
        train_prompt=prompt,
        task_index=index,
        previous_state=None if previous is None else str(previous),
        method_name=METHOD,
        method_params={},
        training={**TRAINING, **training},
        seed=seed,
        output_dir=str(output_dir),
        run={"method": METHOD, "seed": seed},
        concept=f"concept{index}",
        loss_log=str(output_dir / LOSS_LOG),
        progress=False,
    )


def run(base, tasks, output_dir, **kwargs) -> dict:
    return train_task(**call_kwargs(base, tasks, output_dir, **kwargs))


def outcome(directory) -> dict:
    """Everything a finished task leaves that must not depend on an interruption."""
    directory = Path(directory)
    return {
        "lora": load_file(str(directory / LORA_FILE)),
        "loss": (directory / LOSS_LOG).read_bytes(),
        "state": json.loads((directory / STATE_FILE).read_text()),
    }


def assert_same_outcome(directory, expected: dict) -> None:
    got = outcome(directory)
    assert got["lora"].keys() == expected["lora"].keys() and got["lora"]
    for key, tensor in expected["lora"].items():
        assert torch.equal(got["lora"][key], tensor), key
    assert got["loss"] == expected["loss"]
    assert got["state"] == expected["state"]
    assert not (Path(directory) / RESUME_DIR).exists()


def assert_incomplete(directory) -> None:
    directory = Path(directory)
    for name in (STATE_FILE, LORA_FILE, LOSS_LOG):
        assert not (directory / name).exists(), name


def read_checkpoint(directory) -> dict:
    return read_checkpoint_file(Path(directory) / RESUME_DIR / CHECKPOINT_FILE)


class StepHook:
    """Calls `action(step)` inside training steps (from the loss computation, which runs once per
    step), without changing what the step computes."""

    def __init__(self, monkeypatch, action):
        self.step = -1
        real = torch.nn.functional.mse_loss

        def mse_loss(*args, **kwargs):
            self.step += 1
            action(self.step)
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "mse_loss", mse_loss)


def sigterm_during_step(monkeypatch, step: int) -> StepHook:
    def action(current):
        if current == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return StepHook(monkeypatch, action)


@pytest.fixture(scope="module")
def reference(tiny_sd1_dir, synthetic_tasks, tmp_path_factory) -> dict:
    """An uninterrupted run: checkpoints after steps 4 and 8 (none after the last), then removed."""
    directory = tmp_path_factory.mktemp("reference") / "task1"
    manifest = run(tiny_sd1_dir, synthetic_tasks, directory)
    assert manifest["resumed_from_step"] == 0
    assert manifest["timings"]["checkpoints_written"] == len(range(EVERY, STEPS, EVERY)) == 2
    assert sorted(p.name for p in directory.iterdir()) == sorted([LORA_FILE, STATE_FILE, LOSS_LOG])
    return {"dir": directory, "manifest": manifest, **outcome(directory)}


@pytest.fixture(scope="module")
def other_seed(tiny_sd1_dir, synthetic_tasks, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("other_seed") / "task1"
    run(tiny_sd1_dir, synthetic_tasks, directory, seed=1)
    return {"dir": directory, **outcome(directory)}


# ------------------------------------------------------------------------------ real interruptions


DRIVER = """
import json, sys, time
from lorachain.torch_env import torch
from lorachain.train import train_task

torch.set_num_threads(1)
real = torch.nn.functional.mse_loss

def slow_mse_loss(*args, **kwargs):  # slow steps, so that the test's SIGTERM lands mid-training
    time.sleep(0.3)
    return real(*args, **kwargs)

torch.nn.functional.mse_loss = slow_mse_loss
train_task(**json.loads(sys.argv[1]))
"""


def signal_after_first_checkpoint(kwargs: dict, out: Path, log_path: Path, signum: int) -> int:
    """Train in a subprocess (DRIVER), send `signum` once the periodic checkpoint after step 4
    exists, and return the exit code."""
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the child
        process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(DRIVER), json.dumps(kwargs)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    checkpoint = out / RESUME_DIR / CHECKPOINT_FILE
    deadline = time.monotonic() + 180
    try:
        while not checkpoint.exists():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        process.send_signal(signum)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode


def test_sigterm_to_a_training_process_then_rerun_is_bit_identical(tiny_sd1_dir, synthetic_tasks, tmp_path, reference):
    out, log_path = tmp_path / "task1", tmp_path / "job.log"
    returncode = signal_after_first_checkpoint(
        call_kwargs(tiny_sd1_dir, synthetic_tasks, out), out, log_path, signal.SIGTERM
    )
    assert returncode != 0
    stderr = log_path.read_text()
    assert "TrainingInterrupted" in stderr and "interrupted by SIGTERM after step" in stderr, stderr[-3000:]
    assert_incomplete(out)  # an interrupted task never looks complete
    stopped = read_checkpoint(out)["step"]
    assert EVERY <= stopped < STEPS
    assert f"after step {stopped} of {STEPS}" in stderr
    # The job's retry: the same call, in a fresh process state, continues from the checkpoint.
    manifest = run(tiny_sd1_dir, synthetic_tasks, out)
    assert manifest["resumed_from_step"] == stopped
    assert_same_outcome(out, reference)


def test_sigkill_of_a_training_process_then_rerun_resumes_from_the_periodic_checkpoint(
    tiny_sd1_dir, synthetic_tasks, tmp_path, reference
):
    """A hard kill (SIGKILL after the grace period, OOM killer, node failure): no handler runs, the
    process leaves its last periodic checkpoint and no state; the rerun continues from it."""
    out = tmp_path / "task1"
    returncode = signal_after_first_checkpoint(
        call_kwargs(tiny_sd1_dir, synthetic_tasks, out), out, tmp_path / "job.log", signal.SIGKILL
    )
    assert returncode == -signal.SIGKILL
    assert_incomplete(out)
    stopped = read_checkpoint(out)["step"]
    assert stopped % EVERY == 0 and EVERY <= stopped < STEPS
    manifest = run(tiny_sd1_dir, synthetic_tasks, out)
    assert manifest["resumed_from_step"] == stopped
    assert_same_outcome(out, reference)


def test_sigterm_mid_step_stops_after_the_step_and_resumes_bit_identically(
    tiny_sd1_dir, synthetic_tasks, tmp_path, reference, monkeypatch
):
    out = tmp_path / "task1"
    handler_before = signal.getsignal(signal.SIGTERM)
    sigterm_during_step(monkeypatch, 5)
    with pytest.raises(
        TrainingInterrupted,
        match=(
            rf"interrupted by SIGTERM after step 6 of {STEPS}; no state was written; "
            r"checkpoint written to .*resume from step 6"
        ),
    ) as info:
        run(tiny_sd1_dir, synthetic_tasks, out)
    assert isinstance(info.value, TrainingError)
    assert info.value.step == 6 and info.value.checkpoint == out / RESUME_DIR / CHECKPOINT_FILE
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer's handler is gone
    assert_incomplete(out)
    checkpoint = read_checkpoint(out)  # safetensors + JSON metadata: no pickle
    assert checkpoint["step"] == 6 and checkpoint["losses"].shape == (6,)
    assert all(".lora_A." in name or ".lora_B." in name for name in checkpoint["lora"])
    assert len(checkpoint["optimizer"]["state"]) == len(checkpoint["lora"])
    assert {f.name for f in (out / RESUME_DIR).iterdir()} == {CHECKPOINT_FILE}  # no temporary left
    monkeypatch.undo()
    # Another checkpoint interval computes the same thing: the checkpoint still applies.
    manifest = run(tiny_sd1_dir, synthetic_tasks, out, checkpoint_every=5)
    assert manifest["resumed_from_step"] == 6
    assert_same_outcome(out, reference)


def test_crash_mid_step_resumes_from_the_last_periodic_checkpoint(
    tiny_sd1_dir, synthetic_tasks, tmp_path, reference, monkeypatch
):
    """A hard kill (SIGKILL after the grace period, a node failure) leaves only the periodic checkpoint."""
    out = tmp_path / "task1"

    def crash(step):
        if step == 10:
            raise RuntimeError("simulated node failure")

    StepHook(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="simulated node failure"):
        run(tiny_sd1_dir, synthetic_tasks, out)
    assert_incomplete(out)
    checkpoint = read_checkpoint(out)
    assert checkpoint["step"] == 8
    # The checkpoint's losses are the reference run's first 8 (as loss.csv prints them).
    printed = [line.split(",")[1] for line in reference["loss"].decode().splitlines()[1:9]]
    assert [f"{value:.6g}" for value in checkpoint["losses"].tolist()] == printed
    monkeypatch.undo()
    manifest = run(tiny_sd1_dir, synthetic_tasks, out)
    assert manifest["resumed_from_step"] == 8
    assert_same_outcome(out, reference)


def test_sigterm_during_the_last_step_finishes_the_task(
    tiny_sd1_dir, synthetic_tasks, tmp_path, reference, monkeypatch
):
    out = tmp_path / "task1"
    handler_before = signal.getsignal(signal.SIGTERM)
    sigterm_during_step(monkeypatch, STEPS - 1)
    manifest = run(tiny_sd1_dir, synthetic_tasks, out)
    assert manifest["resumed_from_step"] == 0
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert_same_outcome(out, reference)


# ------------------------------------------------------------------------------ other configurations


@pytest.mark.parametrize("change", [{"seed": 1}, {"learning_rate": 2e-3}])
def test_checkpoint_of_another_configuration_is_not_used(
    tiny_sd1_dir, synthetic_tasks, tmp_path, reference, other_seed, monkeypatch, caplog, change
):
    out = tmp_path / "task1"
    sigterm_during_step(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted):
        run(tiny_sd1_dir, synthetic_tasks, out)
    assert read_checkpoint(out)["step"] == 6
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="lorachain.training.resume"):
        manifest = run(tiny_sd1_dir, synthetic_tasks, out, **change)
    assert manifest["resumed_from_step"] == 0
    key = "seed" if "seed" in change else "training"
    assert any(
        "ignoring the in-task checkpoint" in r.getMessage() and key in r.getMessage().split("differs in: ")[-1]
        for r in caplog.records
    ), caplog.text
    assert not (out / RESUME_DIR).exists()
    if "seed" in change:  # equal to a fresh run of the new configuration
        assert_same_outcome(out, other_seed)
    key_B = next(k for k in reference["lora"] if ".lora_B." in k)
    assert not torch.equal(outcome(out)["lora"][key_B], reference["lora"][key_B])  # the change matters


def test_unreadable_checkpoint_is_ignored(tiny_sd1_dir, synthetic_tasks, tmp_path, reference, caplog):
    out = tmp_path / "task1"
    (out / RESUME_DIR).mkdir(parents=True)
    (out / RESUME_DIR / CHECKPOINT_FILE).write_bytes(b"truncated by a node failure")
    with caplog.at_level(logging.WARNING, logger="lorachain.training.resume"):
        manifest = run(tiny_sd1_dir, synthetic_tasks, out)
    assert manifest["resumed_from_step"] == 0
    assert "unreadable" in caplog.text
    assert_same_outcome(out, reference)


def test_task2_resumes_on_its_previous_state_and_ignores_a_changed_one(
    tiny_sd1_dir, synthetic_tasks, tmp_path, reference, other_seed, monkeypatch, caplog
):
    previous = tmp_path / "run" / "task1"
    shutil.copytree(reference["dir"], previous)
    out = tmp_path / "run" / "task2"
    fresh = tmp_path / "run" / "task2_uninterrupted"  # a sibling: the same relative parent
    run(tiny_sd1_dir, synthetic_tasks, fresh, index=2, previous=previous)

    sigterm_during_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted, match="after step 3 of"):
        run(tiny_sd1_dir, synthetic_tasks, out, index=2, previous=previous)
    monkeypatch.undo()
    kept = tmp_path / "kept"
    shutil.copytree(out / RESUME_DIR, kept)
    manifest = run(tiny_sd1_dir, synthetic_tasks, out, index=2, previous=previous)
    assert manifest["resumed_from_step"] == 3
    assert_same_outcome(out, outcome(fresh))

    # Task 1 redone differently (another seed) under the same path: task 2's checkpoint is stale.
    shutil.rmtree(out)
    shutil.copytree(kept, out / RESUME_DIR)
    for name in (LORA_FILE, STATE_FILE):
        shutil.copy(other_seed["dir"] / name, previous / name)
    with caplog.at_level(logging.WARNING, logger="lorachain.training.resume"):
        manifest = run(tiny_sd1_dir, synthetic_tasks, out, index=2, previous=previous)
    assert manifest["resumed_from_step"] == 0
    assert "differs in: previous_state" in caplog.text


# ------------------------------------------------------------------------------ disabled


def test_checkpoint_every_zero_writes_no_checkpoint(tiny_sd1_dir, synthetic_tasks, tmp_path, reference, monkeypatch):
    out = tmp_path / "task1"
    seen = []
    StepHook(monkeypatch, lambda step: seen.append((out / RESUME_DIR).exists()))
    manifest = run(tiny_sd1_dir, synthetic_tasks, out, checkpoint_every=0)
    assert len(seen) == STEPS and not any(seen)
    assert manifest["timings"]["checkpoints_written"] == 0
    assert_same_outcome(out, reference)  # checkpoints never change what is computed


def test_sigterm_with_checkpoints_disabled_still_stops_cleanly(tiny_sd1_dir, synthetic_tasks, tmp_path, monkeypatch):
    out = tmp_path / "task1"
    sigterm_during_step(monkeypatch, 5)
    with pytest.raises(
        TrainingInterrupted,
        match=r"after step 6 of 12; no state was written; no checkpoint \(training.checkpoint_every is 0\)",
    ) as info:
        run(tiny_sd1_dir, synthetic_tasks, out, checkpoint_every=0)
    assert info.value.checkpoint is None
    assert_incomplete(out)
    assert not (out / RESUME_DIR).exists()


# ------------------------------------------------------------------------------ units


def test_deferred_sigterm_restores_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with deferred_sigterm() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop.signum == signal.SIGTERM and calls == []
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert calls == [signal.SIGTERM]
        # Off the main thread no handler can be installed: the context is inert there.
        seen = []
        thread = threading.Thread(target=lambda: seen.append(deferred_sigterm().__enter__().signum))
        thread.start()
        thread.join()
        assert seen == [None]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_checkpoint_every_config():
    assert TrainingConfig.from_dict({}).checkpoint_every == 100
    assert TrainingConfig.from_dict({"checkpoint_every": 0}).checkpoint_every == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(TrainingError, match=r"training\.checkpoint_every"):
            TrainingConfig.from_dict({"checkpoint_every": bad})
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["training"]["properties"]["checkpoint_every"]
    assert schema["type"] == "integer" and schema["minimum"] == 0
    assert schema["default"] == TrainingConfig().checkpoint_every


def test_training_config_defaults_are_the_schemas():
    """The schema is the home of config defaults; TrainingConfig's may not disagree with it."""
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["training"]["properties"]
    defaults = TrainingConfig()
    optimizer = {key: block["default"] for key, block in schema.pop("optimizer")["properties"].items()}
    schema.pop("tracking")  # TrackingConfig's defaults, held equal to the schema's in tests/test_tracking.py
    assert (defaults.optimizer, list(defaults.betas), defaults.weight_decay, defaults.eps) == (
        optimizer["name"],
        optimizer["betas"],
        optimizer["weight_decay"],
        optimizer["eps"],
    )
    flow = {key: block["default"] for key, block in schema.pop("flow_matching")["properties"].items()}
    assert flow == dataclasses.asdict(defaults.flow_matching)
    for key, block in schema.items():
        value = getattr(defaults, key)
        if "default" not in block:  # resolved later (the denoiser's default targets) or required by the model
            assert value is None, key
            continue
        assert (list(value) if isinstance(value, tuple) else value) == block["default"], key
    fields = set(TrainingConfig.__dataclass_fields__)
    assert set(schema) | {"optimizer", "betas", "weight_decay", "eps", "flow_matching"} == fields
