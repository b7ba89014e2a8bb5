"""Live tracking of training jobs (lorachain.training.tracking): tensorboard scalars at every step,
validation images, loss.csv written while training runs, the missing-tracker error, and the
loss-curve figure of the report.

Training runs are task 1 of the tiny SD1 pipeline for a few steps at 64 px, one thread."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorachain.config_checks import tracking_problems
from lorachain.state import LORA_FILE, STATE_FILE
from lorachain.torch_env import torch
from lorachain.train import TrainingError, train_task
from lorachain.training import tracking
from lorachain.training.tracking import TrackingConfig, live_loss_log, tracking_directory

STEPS = 5
TRAINING = dict(rank=4, lora_alpha=8, steps=STEPS, learning_rate=1e-3, resolution=64, batch_size=1, checkpoint_every=0)
SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(base, tasks, output_dir, *, model_source=None, **training) -> dict:
    prompt, images = tasks[0]
    output_dir = Path(output_dir)
    return train_task(
        model_source=str(model_source or base),
        train_images=images,
        train_prompt=prompt,
        task_index=1,
        previous_state=None,
        method_name="merge_init",
        method_params={},
        training={**TRAINING, **training},
        seed=0,
        output_dir=str(output_dir),
        run={"method": "merge_init", "seed": 0},
        concept="concept1",
        loss_log=str(output_dir / "loss.csv"),
        progress=False,
    )


def event_run(output_dir, project: str = "lorachain"):
    """The tensorboard run a task wrote, read back with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tracking_directory(output_dir) / project), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def losses(path) -> list[float]:
    with open(path, newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


# ------------------------------------------------------------------------------ config


def test_tracking_defaults_are_the_schemas():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["training"]["properties"]["tracking"]
    defaults = TrackingConfig()
    assert schema["default"] == {} and defaults.log_with == "tensorboard" and not defaults.validation_images
    for key, block in schema["properties"].items():
        assert getattr(defaults, key) == block["default"], key
    assert set(schema["properties"]) == set(TrackingConfig.__dataclass_fields__)
    assert schema["properties"]["log_with"]["enum"] == list(tracking.TRACKERS)


def test_bad_tracking_blocks_name_the_key():
    with pytest.raises(TrainingError, match=r"training\.tracking: unknown field\(s\) \['log'\]"):
        TrackingConfig.from_dict({"log": "tensorboard"})
    with pytest.raises(TrainingError, match=r"training\.tracking\.log_with: 'mlflow' is not one of"):
        TrackingConfig.from_dict({"log_with": "mlflow"})


def test_a_missing_tracker_fails_before_training_and_in_the_dry_run_checks(tmp_path, monkeypatch):
    """wandb is not installed here; tensorboard is hidden for the second half."""
    import importlib.util

    assert importlib.util.find_spec("wandb") is None, "this test expects wandb not to be installed"
    message = r"training\.tracking\.log_with: wandb needs the wandb package.*pip install lorachain\[wandb\]"
    # a model that does not exist: the error comes before anything is loaded
    with pytest.raises(TrainingError, match=message):
        train(tmp_path / "no-model", [("a photo", ["x.jpg"])], tmp_path / "out", tracking={"log_with": "wandb"})
    assert not (tmp_path / "out").exists()
    [problem] = tracking_problems({"training": {"tracking": {"log_with": "wandb"}}})
    assert "training.tracking.log_with" in problem and "pip install lorachain[wandb]" in problem
    assert tracking_problems({"training": {"tracking": {"log_with": "none"}}}) == []
    assert tracking_problems({"training": {}}) == []  # tensorboard (the default) is installed

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a)
    )
    [problem] = tracking_problems({"training": {"tracking": {}}})
    assert "training.tracking.log_with: tensorboard needs the tensorboard package" in problem
    assert "pip install tensorboard" in problem and "log_with: none" in problem


def test_the_dry_run_config_check_reports_the_tracker(monkeypatch):
    """check_config (run while the Snakefile parses) includes the tracker problem."""
    from lorachain import config_checks

    monkeypatch.setattr(config_checks, "domain_problems", lambda config: [])
    monkeypatch.setattr(config_checks, "modular_problems", lambda config: [])
    monkeypatch.setattr(config_checks, "registered_block_problems", lambda config: [])
    monkeypatch.setattr(config_checks, "composition_problems", lambda config: [])
    monkeypatch.setattr(config_checks, "model_source_problems", lambda config, encoders: [])
    monkeypatch.setattr(config_checks.plan, "encoders_in_use", lambda config: [])
    with pytest.raises(config_checks.ConfigError, match=r"training\.tracking\.log_with: wandb"):
        config_checks.check_config({"training": {"tracking": {"log_with": "wandb"}}})


# ------------------------------------------------------------------------------ training


def test_tensorboard_logs_loss_lr_and_grad_norm_at_every_step(tiny_sd1_dir, synthetic_tasks, tmp_path):
    """Every step's loss (the loss.csv value), learning rate and gradient norm are in the event
    files; the state, its manifest and loss.csv are byte-identical to a run without tracking."""
    tracked = train(tiny_sd1_dir, synthetic_tasks, tmp_path / "tracked")
    run = event_run(tmp_path / "tracked")
    steps = list(range(STEPS))
    loss, lr, norm = (scalars(run, f"train/{name}") for name in ("loss", "lr", "grad_norm"))
    assert sorted(loss) == sorted(lr) == sorted(norm) == steps
    assert [loss[step] for step in steps] == pytest.approx(losses(tmp_path / "tracked" / "loss.csv"), rel=1e-5)
    assert all(value == pytest.approx(TRAINING["learning_rate"]) for value in lr.values())
    assert all(np.isfinite(value) and value > 0 for value in norm.values())

    untracked = train(tiny_sd1_dir, synthetic_tasks, tmp_path / "untracked", tracking={"log_with": "none"})
    assert not tracking_directory(tmp_path / "untracked").exists()
    assert tracking_directory(tmp_path / "tracked") == tmp_path / "tracking" / "tracked"
    assert sorted(path.name for path in (tmp_path / "tracked").iterdir()) == sorted([LORA_FILE, STATE_FILE, "loss.csv"])
    for name in (LORA_FILE, STATE_FILE, "loss.csv"):
        assert (tmp_path / "tracked" / name).read_bytes() == (tmp_path / "untracked" / name).read_bytes(), name
    assert tracked["final_loss"] == untracked["final_loss"]


def test_logged_learning_rate_is_the_one_each_step_used(tiny_sd1_dir, synthetic_tasks, tmp_path):
    """With a schedule, step s logs the learning rate its update used: diffusers' get_scheduler
    on a plain torch optimizer, read before each step."""
    from diffusers.optimization import get_scheduler

    train(tiny_sd1_dir, synthetic_tasks, tmp_path / "out", lr_scheduler="linear", lr_warmup_steps=2)
    logged = scalars(event_run(tmp_path / "out"), "train/lr")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=TRAINING["learning_rate"])
    schedule = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=2, num_training_steps=STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [logged[step] for step in range(STEPS)] == pytest.approx(expected)
    assert expected[0] == 0 and expected[2] == pytest.approx(TRAINING["learning_rate"])  # warm-up, then decay


def test_grad_norm_without_clipping_is_the_norm_clipping_computes(tiny_sd1_dir, synthetic_tasks, tmp_path):
    """Step 0 sees the same weights and batch with or without clipping: the norm computed for the
    tracker (max_grad_norm 0) equals the one accelerate's clip_grad_norm_ returns."""
    train(tiny_sd1_dir, synthetic_tasks, tmp_path / "clipped", steps=1, max_grad_norm=1.0)
    train(tiny_sd1_dir, synthetic_tasks, tmp_path / "free", steps=1, max_grad_norm=0.0)
    clipped = scalars(event_run(tmp_path / "clipped"), "train/grad_norm")[0]
    free = scalars(event_run(tmp_path / "free"), "train/grad_norm")[0]
    assert free == pytest.approx(clipped, rel=1e-5) and free > 0


def test_loss_csv_is_written_while_training_runs(tiny_sd1_dir, synthetic_tasks, tmp_path, monkeypatch):
    """After every step the live file holds the header and one row per step so far, flushed; the
    finished file is renamed to loss.csv (which does not exist before)."""
    import lorachain.train as trainer

    output = tmp_path / "out"
    seen = []
    record_step = trainer._record_step

    def watching(step, *args):
        record_step(step, *args)
        seen.append((step, live_loss_log(output / "loss.csv").read_text(), (output / "loss.csv").exists()))

    monkeypatch.setattr(trainer, "_record_step", watching)
    train(tiny_sd1_dir, synthetic_tasks, output, tracking={"log_with": "none"})
    assert [step for step, _, _ in seen] == list(range(STEPS))
    for step, text, published in seen:
        rows = list(csv.reader(io.StringIO(text)))
        assert rows[0] == ["step", "loss"] and [int(row[0]) for row in rows[1:]] == list(range(step + 1))
        assert not published
    assert (output / "loss.csv").read_text() == seen[-1][1]
    assert not live_loss_log(output / "loss.csv").exists()


def test_validation_images_are_the_states_samples(tiny_sd1_dir, synthetic_tasks, tmp_path):
    """validation_images logs seeds 0..n-1 of the task's prompt from the written state (the
    sampling code's pipeline with the state applied), side by side, at the last step."""
    from PIL import Image

    from lorachain.sample import load_model_for_sampling

    output = tmp_path / "out"
    block = {"validation_images": True, "validation_samples": 2, "validation_steps": 2}
    manifest = train(tiny_sd1_dir, synthetic_tasks, output, steps=2, tracking=block)
    assert manifest["timings"]["validation_s"] > 0
    [event] = event_run(output).Images("validation")
    assert event.step == 2
    logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert logged.shape == (64, 128, 3) and logged.std() > 0
    pipe = load_model_for_sampling(str(tiny_sd1_dir), None, output, "merge_init", {})
    prompt = synthetic_tasks[0][0]
    for seed in range(2):
        expected = pipe(
            prompt=prompt,
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images[0]
        cell = logged[:, seed * 64 : (seed + 1) * 64]  # tensorboard's grid: side by side, no padding
        assert np.abs(cell.astype(int) - np.round(expected * 255).astype(int)).max() <= 1
    assert json.loads((output / STATE_FILE).read_text())["steps"] == 2


def test_sampling_prints_progress_with_a_rate_and_an_eta(tiny_sd1_dir, monkeypatch):
    """render_prompts reports images/s and an ETA in the job's log (stderr, a file there) as it
    goes, one line per update, and the images are those of a run without the log."""
    from lorachain import progress
    from lorachain.models.loading import load_pipeline
    from lorachain.sample import SamplingConfig, render_prompts

    pipe = load_pipeline(str(tiny_sd1_dir))
    pipe.set_progress_bar_config(disable=True)
    config = SamplingConfig.from_dict({"num_samples": 2, "steps": 2, "resolution": 32, "batch_size": 1})
    jobs = [("a photo of sks backpack", sample) for sample in range(2)]
    quiet = [np.asarray(image) for image in render_prompts(pipe, jobs, config)]
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line at every update
    logged = [np.asarray(image) for image in render_prompts(pipe, jobs, config)]
    lines = log.getvalue().splitlines()
    assert all(np.array_equal(a, b) for a, b in zip(quiet, logged)) and len(logged) == 2
    assert lines[0].startswith("sampling:") and "0/2" in lines[0]
    assert "2/2" in lines[-1] and "img/s" in lines[-1] and "<00:00" in lines[-1]
    assert all("\r" not in line for line in lines)


# ------------------------------------------------------------------------------ report


def write_loss_csv(path: Path, values) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step,loss\n" + "".join(f"{step},{value:.6g}\n" for step, value in enumerate(values)))
    return path


def test_loss_curve_figure_of_hand_made_loss_files(tmp_path):
    from lorachain.report.losses import chain_losses, loss_curves_job, running_mean, runs_by_method

    rng = np.random.default_rng(0)
    loss_logs = {}
    for method in ("naive", "magmax"):
        for task in (1, 2):
            values = 0.5 / (1 + np.arange(40)) + 0.01 * rng.random(40)
            path = write_loss_csv(tmp_path / method / f"task{task}" / "loss.csv", values)
            loss_logs[f"{method}|0|0|{task}"] = str(path)
    runs = runs_by_method(loss_logs, ["magmax", "naive"])
    assert list(runs) == ["magmax", "naive"] and list(runs["naive"]) == ["order 0, seed 0"]
    losses, starts = chain_losses(runs["naive"]["order 0, seed 0"])
    assert len(losses) == 80 and starts == [40]
    assert losses[40] == pytest.approx(0.5, abs=0.011)  # task 2 starts high again
    direct = [np.mean(losses[max(0, i - 3) : i + 1]) for i in range(len(losses))]
    assert running_mean(losses, 4) == pytest.approx(direct)

    png, pdf = tmp_path / "figures" / "losses.png", tmp_path / "figures" / "losses.pdf"
    summary = loss_curves_job(loss_logs=loss_logs, methods=["naive", "magmax"], domain="objects", png=png, pdf=pdf)
    assert summary["runs"] == 2 and png.stat().st_size > 0 and pdf.stat().st_size > 0
    first = png.read_bytes(), pdf.read_bytes()
    loss_curves_job(loss_logs=loss_logs, methods=["naive", "magmax"], domain="objects", png=png, pdf=pdf)
    assert (png.read_bytes(), pdf.read_bytes()) == first  # deterministic


def test_a_damaged_loss_csv_is_named(tmp_path):
    from lorachain.report.losses import LossLogError, read_loss_log

    bad = tmp_path / "loss.csv"
    bad.write_text("step,loss\n0,0.5\n2,0.4\n")
    with pytest.raises(LossLogError, match=r"loss\.csv: steps are not 0, 1"):
        read_loss_log(bad)
    bad.write_text("iteration,value\n0,0.5\n")
    with pytest.raises(LossLogError, match=r"loss\.csv: expected the columns step,loss"):
        read_loss_log(bad)
