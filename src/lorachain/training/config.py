"""The ``training`` config block, the trainer's errors, and the per-task seed rule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Derived seeds: the reference reuses one seed for every task, which makes every fresh A identical
# across tasks. Task t of a run (policy `per_task`), and concept c of the modular regime, get the
# seed `seed * SEED_STRIDE + t` (resp. `+ c`): see derived_seed.
SEED_STRIDE = 1000
SEED_POLICIES = ("per_task", "same")


class TrainingError(RuntimeError):
    """Training cannot start or did not finish; the message names the config key or file."""


class TrainingInterrupted(TrainingError):
    """SIGTERM (SLURM preemption or walltime, scancel) stopped training at the end of a step; the
    in-task checkpoint was written (unless training.checkpoint_every is 0), no state was."""

    def __init__(self, message: str, *, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class TrainingConfig:
    """The ``training`` block. The defaults are the config schema's
    (workflow/schemas/config.schema.yaml, which fills them in before any job runs); a test holds
    them equal."""

    rank: int = 64
    lora_alpha: float = 64
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 850
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    resolution: int = 1024
    batch_size: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed_policy: str = "per_task"
    checkpoint_every: int = 100  # in-task resume checkpoint every N steps (and on SIGTERM); 0: none

    @classmethod
    def from_dict(cls, block: dict) -> "TrainingConfig":
        block = dict(block)
        optimizer = block.pop("optimizer", {}) or {}
        known = set(cls.__dataclass_fields__)
        unknown = set(block) - known
        if unknown:
            raise TrainingError(f"config key training: unknown field(s) {sorted(unknown)}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in block.items()}
        if optimizer:
            fields["optimizer"] = optimizer.get("name", cls.optimizer)
            for key in ("betas", "weight_decay", "eps"):
                if key in optimizer:
                    fields[key] = tuple(optimizer[key]) if key == "betas" else optimizer[key]
        config = cls(**fields)
        if config.seed_policy not in SEED_POLICIES:
            raise TrainingError(
                f"config key training.seed_policy: {config.seed_policy!r} is not one of {SEED_POLICIES}"
            )
        if (
            isinstance(config.checkpoint_every, bool)
            or not isinstance(config.checkpoint_every, int)
            or config.checkpoint_every < 0
        ):
            raise TrainingError(
                f"config key training.checkpoint_every: {config.checkpoint_every!r} is not an integer >= 0 "
                "(0 disables in-task checkpoints)"
            )
        return config

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def derived_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th task of a run (or concept of a domain) trained with `seed`."""
    return seed * SEED_STRIDE + index


def task_seed(seed: int, task_index: int, policy: str) -> int:
    return seed if policy == "same" else derived_seed(seed, task_index)
