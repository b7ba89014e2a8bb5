"""The ``training`` config block, the trainer's errors, and the per-task seed rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
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


WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass(frozen=True)
class FlowMatchingConfig:
    """``training.flow_matching``: diffusers' names and defaults (train_dreambooth_lora_sd3.py)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def from_dict(cls, block: dict | None) -> FlowMatchingConfig:
        block = dict(block or {})
        unknown = set(block) - set(cls.__dataclass_fields__)
        if unknown:
            raise TrainingError(f"config key training.flow_matching: unknown field(s) {sorted(unknown)}")
        config = cls(**block)
        if config.weighting_scheme not in WEIGHTING_SCHEMES:
            raise TrainingError(
                f"config key training.flow_matching.weighting_scheme: {config.weighting_scheme!r} is not one of "
                f"{', '.join(WEIGHTING_SCHEMES)}"
            )
        return config


@dataclass(frozen=True)
class TrainingConfig:
    """The ``training`` block. The defaults are the config schema's
    (workflow/schemas/config.schema.yaml, which fills them in before any job runs); a test holds
    them equal."""

    rank: int = 64
    lora_alpha: float = 64
    target_modules: tuple[str, ...] | str | None = None  # None: the denoiser family's default targets
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
    # DreamBooth-script options (docs/protocol.md). Off at their defaults, and then left out of the
    # manifest and the checkpoint fingerprint, so states trained without them stay byte-identical.
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    random_flip: bool = False
    lora_dropout: float = 0.0
    use_rslora: bool = False
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    # Diffusion transformers (SD3, FLUX): the flow-matching timestep density and loss weighting, and
    # the value FLUX.1-dev's guidance embedding is trained with (None for models without one).
    flow_matching: FlowMatchingConfig = FlowMatchingConfig()
    guidance: float | None = None

    @classmethod
    def from_dict(cls, block: dict) -> "TrainingConfig":
        block = dict(block)
        optimizer = block.pop("optimizer", {}) or {}
        known = set(cls.__dataclass_fields__)
        unknown = set(block) - known
        if unknown:
            raise TrainingError(f"config key training: unknown field(s) {sorted(unknown)}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in block.items()}
        if "flow_matching" in fields:
            fields["flow_matching"] = FlowMatchingConfig.from_dict(fields["flow_matching"])
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
        config.check_options()
        return config

    def check_options(self) -> None:
        """The DreamBooth-script options' values (the schema checks them too; the library is also
        called without it)."""
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise TrainingError(
                f"config key training.lr_scheduler: {self.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}"
            )
        for key, least in (("lr_warmup_steps", 0), ("gradient_accumulation_steps", 1), ("num_class_images", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TrainingError(f"config key training.{key}: {value!r} is not an integer >= {least}")
        if not 0 <= self.lora_dropout < 1:
            raise TrainingError(f"config key training.lora_dropout: {self.lora_dropout!r} is not in [0, 1)")
        if self.prior_loss_weight < 0:
            raise TrainingError(f"config key training.prior_loss_weight: {self.prior_loss_weight!r} is negative")

    def options_set(self) -> dict:
        """The DreamBooth-script options whose value is not the default (off): what the manifest
        and the fingerprint record. The prior's weight and image count count only with the prior."""
        values = {key: getattr(self, key) for key in TRAINING_OPTIONS if getattr(self, key) != _OPTION_DEFAULTS[key]}
        if not self.prior_preservation:
            values = {key: value for key, value in values.items() if key not in _PRIOR_DETAILS}
        if isinstance(self.target_modules, str):  # a regex (peft's semantics) rather than suffixes
            values["target_modules"] = self.target_modules
        return values

    def used_options(self) -> set[str]:
        """The option names a method must support for this block (see ContinualMethod.training_options)."""
        used = set(self.options_set()) - set(_PRIOR_DETAILS)
        return {"lr_scheduler" if key == "lr_warmup_steps" else key for key in used}

    def with_targets(self, default_targets: tuple[str, ...]) -> "TrainingConfig":
        """This block with the denoiser family's default targets where it names none."""
        return self if self.target_modules is not None else replace(self, target_modules=tuple(default_targets))

    @property
    def scale(self) -> float:
        """peft's scaling of the LoRA branch: alpha / r, or rsLoRA's alpha / sqrt(r)."""
        return self.lora_alpha / math.sqrt(self.rank) if self.use_rslora else self.lora_alpha / self.rank


# diffusers.optimization.get_scheduler's names (SchedulerType), bar piecewise_constant, which needs
# step rules this config has no key for.
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
TRAINING_OPTIONS = (
    "lr_scheduler",
    "lr_warmup_steps",
    "gradient_accumulation_steps",
    "random_flip",
    "lora_dropout",
    "use_rslora",
    "prior_preservation",
    "prior_loss_weight",
    "num_class_images",
)
_OPTION_DEFAULTS = {name: TrainingConfig.__dataclass_fields__[name].default for name in TRAINING_OPTIONS}
_PRIOR_DETAILS = ("prior_loss_weight", "num_class_images")  # meaningful only with prior_preservation


def derived_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th task of a run (or concept of a domain) trained with `seed`."""
    return seed * SEED_STRIDE + index


def task_seed(seed: int, task_index: int, policy: str) -> int:
    return seed if policy == "same" else derived_seed(seed, task_index)


def unset_options(block: dict) -> list[str]:
    """The DreamBooth-script options of a ``training`` config block that are at their default (or,
    for the prior's weight and image count, without prior preservation): the workflow leaves them
    out of a job's params, so filling in their schema defaults reruns nothing."""
    prior = block.get("prior_preservation", False)
    return [
        key
        for key in TRAINING_OPTIONS
        if key in block and (block[key] == _OPTION_DEFAULTS[key] or (key in _PRIOR_DETAILS and not prior))
    ]
