"""Live tracking of a training job: accelerate's trackers and a loss.csv written as training runs.

``training.tracking`` (:class:`TrackingConfig`) picks an accelerate tracker (``log_with``:
tensorboard, the default, or wandb, or none). The trainer's accelerator is built with it
(``Accelerator(log_with=..., project_config=...)``), :class:`StepTracker` starts it
(``init_trackers``), logs loss, learning rate and gradient norm at every step (``accelerator.log``)
and, when ``validation_images`` is on, a few samples of the task's prompt with fixed seeds once the
task's state is written; ``end_training`` closes it. Event files hold wall times: they are logs.
The workflow's jobs write them beside their log (``logs/<run>/tracking/<task dir's name>/``;
``tensorboard --logdir logs`` shows every run); a library or CLI call without a directory writes
them beside the task's directory, never in it (:func:`tracking_directory`), so the state's directory
holds what it always held and its files stay byte-identical with tracking on or off.

:class:`LossLog` writes the losses while training runs, to ``loss.csv.live`` beside ``loss.csv``:
the header and the losses a resumed job restored from its checkpoint when the loop starts, then one
line per step, flushed (``tail -f`` it, or read it from a notebook). When the task's state is
written, :func:`publish_loss_log` renames it to ``loss.csv`` (atomic), so a ``loss.csv`` is always
complete and an interrupted job leaves none. A resumed job rewrites the rows it restored, so it ends
with the same bytes as an uninterrupted one.

Nothing here changes what is trained: the gradient norm is the one clipping computes (or, without
clipping, the same norm computed without touching the gradients), and validation images are drawn
after the state is written, from their own generators.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from lorachain.training.config import TrainingError

TRACKERS = ("tensorboard", "wandb", "none")
TRACKING_DIR = "tracking"  # <run dir>/tracking/<task dir's name>/: the tracker's files, not the state's
# the module a tracker needs, and how to install it
_TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard (a dependency of lorachain: pip install lorachain)"),
    "wandb": ("wandb", "pip install lorachain[wandb]"),
}
_KEY = "training.tracking"


@dataclass(frozen=True)
class TrackingConfig:
    """The ``training.tracking`` block. The defaults are the config schema's (a test holds them
    equal): tensorboard at every step, no validation images (they cost a sampling run per task)."""

    log_with: str = "tensorboard"
    project: str = "lorachain"
    validation_images: bool = False
    validation_samples: int = 2  # images of the task's prompt, seeds 0 .. validation_samples - 1
    validation_steps: int = 25  # sampling steps of each validation image

    @classmethod
    def from_dict(cls, block: dict | None) -> "TrackingConfig":
        block = dict(block or {})
        unknown = set(block) - {field.name for field in fields(cls)}
        if unknown:
            raise TrainingError(f"config key {_KEY}: unknown field(s) {sorted(unknown)}")
        config = cls(**block)
        if config.log_with not in TRACKERS:
            raise TrainingError(f"config key {_KEY}.log_with: {config.log_with!r} is not one of {TRACKERS}")
        return config

    @property
    def enabled(self) -> bool:
        return self.log_with != "none"


def tracking_directory(output_dir: str | Path) -> Path:
    """Where the trackers of the task whose state goes to `output_dir` write: a sibling directory
    (``<parent>/tracking/<name>``)."""
    output_dir = Path(output_dir)
    return output_dir.parent / TRACKING_DIR / output_dir.name


def tracker_problem(log_with: str) -> str | None:
    """Why the tracker `log_with` cannot run here (its package is not installed), or None."""
    if log_with not in _TRACKER_PACKAGES:
        return None
    module, fix = _TRACKER_PACKAGES[log_with]
    if importlib.util.find_spec(module) is not None:
        return None
    return (
        f"config key {_KEY}.log_with: {log_with} needs the {module} package, which is not installed; "
        f"{fix}, or set {_KEY}.log_with: none"
    )


def check_tracker(tracking: TrackingConfig) -> None:
    """Raise :class:`TrainingError` before training starts when the tracker is not installed."""
    problem = tracker_problem(tracking.log_with)
    if problem:
        raise TrainingError(problem)


def accelerator_options(tracking: TrackingConfig, directory: str | Path) -> dict:
    """``Accelerator`` keyword arguments for the tracker (none when tracking is off)."""
    if not tracking.enabled:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {
        "log_with": tracking.log_with,
        "project_config": ProjectConfiguration(project_dir=str(directory), logging_dir=str(directory)),
    }


def flat_hyperparameters(values: dict, prefix: str = "") -> dict:
    """`values` as the flat str/int/float/bool mapping trackers store as hyperparameters (nested
    keys joined with '.', lists and other values as text)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_hyperparameters(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class StepTracker:
    """The accelerator's trackers for one task: started with the run's hyperparameters, one record
    per step, validation images at the end, closed by :meth:`end`. With ``log_with: none`` every
    call does nothing."""

    def __init__(self, accelerator, tracking: TrackingConfig, directory: str | Path, run_name: str):
        self.accelerator = accelerator
        self.tracking = tracking
        self.directory = Path(directory)
        self.run_name = run_name
        self.started = False

    def start(self, hyperparameters: dict, fresh: bool) -> None:
        """Start the trackers; a fresh (not resumed) run first drops an earlier attempt's files."""
        if not self.tracking.enabled:
            return
        if fresh:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        init_kwargs = {"wandb": {"name": self.run_name, "dir": str(self.directory)}}
        self.accelerator.init_trackers(
            self.tracking.project, config=flat_hyperparameters(hyperparameters), init_kwargs=init_kwargs
        )
        self.started = True

    def log_step(self, step: int, loss: float, learning_rate: float, grad_norm: float | None) -> None:
        """Loss, learning rate and gradient norm of step `step` (0-based, as in loss.csv)."""
        if not self.started:
            return
        values = {"train/loss": loss, "train/lr": learning_rate}
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        self.accelerator.log(values, step=step)

    def log_images(self, images: list, step: int) -> None:
        """PIL images under ``validation``: tensorboard takes one NHWC array, wandb a list."""
        if not (self.started and images):
            return
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                batch = np.stack([np.asarray(image.convert("RGB")) for image in images])
                tracker.log_images({"validation": batch}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({"validation": images}, step=step)

    def end(self) -> None:
        if self.started:
            self.accelerator.end_training()
            self.started = False


def gradient_norm(parameters) -> float:
    """The total 2-norm of the gradients of `parameters`, computed without changing them (what
    clip_grad_norm_ returns, for runs that do not clip)."""
    from lorachain.torch_env import torch

    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads))


def validation_images(pipe, prompt: str, tracking: TrackingConfig, resolution: int) -> list:
    """`validation_samples` images of `prompt`, seed i for image i, at the training resolution."""
    from lorachain.embeddings import model_prompt
    from lorachain.torch_env import torch

    images = []
    for seed in range(tracking.validation_samples):
        generator = torch.Generator("cpu").manual_seed(seed)
        result = pipe(
            prompt=model_prompt(pipe, prompt),
            num_inference_steps=tracking.validation_steps,
            height=resolution,
            width=resolution,
            generator=generator,
            output_type="pil",
        )
        images += result.images
    return images


def live_loss_log(path: str | Path) -> Path:
    """Where the losses of `path` (a loss.csv) are written while training runs."""
    path = Path(path)
    return path.with_name(f"{path.name}.live")


def publish_loss_log(path: str | Path) -> None:
    """The finished live loss log becomes `path` (atomic rename)."""
    os.replace(live_loss_log(path), path)


class LossLog:
    """The losses (columns step, loss) written as training runs to :func:`live_loss_log`: the
    header and the rows of the losses so far when opened, then one flushed line per step, so the
    file can be read (or plotted) while the job runs. The format is the one loss.csv always had."""

    HEADER = ("step", "loss")

    def __init__(self, loss_csv: str | Path, losses: list[float]):
        self.path = live_loss_log(loss_csv)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", newline="")  # noqa: SIM115 - open for the whole loop
        self._writer = csv.writer(self._handle)
        self._writer.writerow(self.HEADER)
        self._writer.writerows(self.row(step, value) for step, value in enumerate(losses))
        self._handle.flush()

    @staticmethod
    def row(step: int, loss: float) -> tuple:
        return step, f"{loss:.6g}"

    def append(self, step: int, loss: float) -> None:
        self._writer.writerow(self.row(step, loss))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "LossLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
