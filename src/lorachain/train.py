"""One trainer for every continual method (diffusers + peft + accelerate).

A task's job: load the base pipeline, fold the previous task's state into the U-Net (W0 + merged),
let the method initialise the new adapter, train it with plain epsilon-prediction MSE, and write the
task's LoRA and manifest (:mod:`lorachain.state`). Nothing here names a method.

Speed choices that keep the objective unchanged: the training images get one fixed crop each, so
their VAE posteriors (mean, std) are computed once per task and a latent is drawn from them at every
step (what encoding at every step would give); the prompt embedding is computed once per task; the
VAE and text encoders are dropped before the first step.

Embedding-weight tuning (a method's ``embeddings`` parameter, :mod:`lorachain.training.embeddings`):
the concept's new tokens are added to the text encoder(s), the training prompt names the concept
by its token and is encoded at every step with gradients into the new rows only, which train in
their own optimizer group (their learning rate, their own gradient clipping) and are part of the
in-task checkpoint; the state gets ``embeddings.safetensors``. Without it nothing here changes.

Preemption (SLURM requeue, walltime, a Snakemake retry): every ``training.checkpoint_every`` steps,
and at the end of the step during which SIGTERM arrives, the trainer writes an in-task checkpoint to
``<task dir>/.resume/checkpoint.safetensors`` (not a declared output, so a retry keeps it): the LoRA
factors, the optimizer (and grad-scaler) state, the losses so far and the state of the step
generator as tensors, with the step, the optimizer's hyperparameters and a fingerprint of the run as
JSON in the file's metadata (no pickle anywhere). A rerun of the same call continues from it and
ends bit-identical to an uninterrupted run (the crops, posteriors and prompt embedding are
recomputed deterministically); a checkpoint of another configuration is logged and deleted.
``.resume/`` goes once the state is written (:mod:`lorachain.training.resume`).

:func:`train_task` runs one task as named phases: load the model and images, set up the adapter on
the folded state, encode the training data, prepare the U-Net, restore a checkpoint, loop, collect
the trained factors, write the state. The parts live in :mod:`lorachain.training`; the names tests
and callers use are re-exported here. :func:`train_task_job` is the ``train_task`` rule's job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorachain import provenance
from lorachain.methods import ContinualMethod, LayerAdapter, make_method
from lorachain.models.denoisers import denoiser, is_sdxl, unet_kwargs
from lorachain.progress import progress as progress_bar
from lorachain.state import LORA_FILE, apply_to_unet, fold_state, read_manifest, write_task_state
from lorachain.torch_env import torch
from lorachain.training.adapters import (
    OutputErasure,
    check_rank,
    initial_adapters,
    inject_lora,
    lora_layers,
    trained_adapters,
)
from lorachain.training.conditioning import encode_condition, load_training_image, sdxl_time_ids
from lorachain.training.config import (
    SEED_POLICIES,
    SEED_STRIDE,
    TrainingConfig,
    TrainingError,
    TrainingInterrupted,
    derived_seed,
    task_seed,
)
from lorachain.training.embeddings import TrainableTokens, add_concept_tokens
from lorachain.training.resume import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    RESUME_DIR,
    CheckpointWriter,
    deferred_sigterm,
    load_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from lorachain.training.tracking import (
    LossLog,
    StepTracker,
    TrackingConfig,
    accelerator_options,
    check_tracker,
    gradient_norm,
    publish_loss_log,
    tracking_directory,
    validation_images,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT",
    "RESUME_DIR",
    "SEED_POLICIES",
    "SEED_STRIDE",
    "OutputErasure",
    "TrainingConfig",
    "TrainingError",
    "TrainingInterrupted",
    "check_rank",
    "deferred_sigterm",
    "derived_seed",
    "encode_condition",
    "initial_adapters",
    "inject_lora",
    "is_sdxl",
    "load_checkpoint",
    "load_training_image",
    "lora_layers",
    "read_checkpoint",
    "run_fingerprint",
    "save_checkpoint",
    "task_seed",
    "train_task",
    "train_task_from_file",
    "train_task_job",
    "trained_adapters",
    "unet_kwargs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """What one call trains: the task, the state it starts from, its seeds and where it goes."""

    model_source: str
    vae: str | None
    train_images: list[str]
    train_prompt: str
    task_index: int
    previous_state: str | Path | None
    seed: int  # the run's (or concept's) seed
    this_seed: int  # the task's own seed (training.seed_policy)
    slot: int
    concept: str | None
    run: dict
    output_dir: Path
    concept_phrase: str | None = None  # how prompts name the concept ("sks", "palette knife")
    init_words: str | None = None  # the concept's own words ("sneaker", "palette knife")
    class_images: tuple[str, ...] = ()  # prior preservation: the base model's images of the class
    class_prompt: str | None = None  # prior preservation: "a photo of a sneaker"

    @property
    def resume_dir(self) -> Path:
        return self.output_dir / RESUME_DIR

    @property
    def label(self) -> str:
        return f"task {self.task_index} ({self.concept})"


@dataclass
class TrainingData:
    """What every step draws from, computed once per task: the VAE posteriors of the training
    images, the prompt's conditioning, SDXL's time ids and the noise schedule."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    family: object  # the denoiser's family (lorachain.models.denoisers): latent scaling, forward call
    condition: dict
    time_ids: torch.Tensor | None
    objective: object  # lorachain.training.objective: DDPM denoising or flow matching
    count: int
    tokens: TrainableTokens | None = None  # embedding tuning: the prompt is encoded at every step
    seed: int = 0  # the task's seed: per-step draws that must not touch the step generator
    flipped: tuple | None = None  # random_flip: (mean, std) of the mirrored images' posteriors
    prior: ClassData | None = None  # prior preservation's class images
    guidance: float | None = None  # FLUX.1-dev's guidance embedding's value (training.guidance)


@dataclass
class ClassData:
    """Prior preservation's class images, encoded once per task: posteriors (and those of their
    mirror images with random_flip), the class prompt's conditioning and SDXL's time ids."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    condition: dict
    time_ids: torch.Tensor | None
    count: int
    flipped: tuple | None = None


@dataclass
class PreparedUNet:
    """The U-Net with the task's adapter injected, and what trains it."""

    unet: torch.nn.Module
    optimizer: object
    accelerator: object
    weight_dtype: torch.dtype
    lora_config: dict
    trainable: list  # the trained factors' parameters, in the optimizer's order
    named_trainable: list  # (name, parameter) of the same and of the token rows, what a checkpoint stores
    erasure: OutputErasure | None
    token_rows: list = field(default_factory=list)  # embedding tuning's trainable rows (own group)
    lr_schedule: object | None = None  # training.lr_scheduler other than constant, stepped per step


@dataclass
class Progress:
    """Where training stands: the step generator, the losses so far and the step it started from."""

    generator: torch.Generator
    losses: list[float] = field(default_factory=list)
    start_step: int = 0


# ------------------------------------------------------------------------------ set-up


def _optimizer(params, config: TrainingConfig):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps
        )
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise TrainingError(
                "config key training.optimizer.name: adamw8bit needs the bitsandbytes package (GPU); "
                "install it or use adamw"
            ) from None
        return bitsandbytes.optim.AdamW8bit(
            params, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps
        )
    raise TrainingError(
        f"config key training.optimizer.name: unknown optimiser {config.optimizer!r}; use adamw or adamw8bit"
    )


def _accelerator(config: TrainingConfig, tracking_options: dict | None = None):
    """The task's accelerator; `tracking_options` are the tracker's (:func:`accelerator_options`)."""
    from accelerate import Accelerator

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("config key training.mixed_precision: fp16 needs a CUDA GPU; use 'no' (or 'bf16') on a CPU")
    return Accelerator(
        mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(), **(tracking_options or {})
    )


def _checked_task(
    *, config: TrainingConfig, method: ContinualMethod, method_key: str, output_dir, slot: int | None, **fields
) -> TaskSpec:
    """The task as a :class:`TaskSpec`, after the checks that need no model."""
    task_index, previous_state = fields["task_index"], fields["previous_state"]
    if method.embeddings is not None and not fields.get("concept_phrase"):
        raise TrainingError(
            f"task {task_index} ({fields['concept']}): {method_key}.embeddings needs the concept's phrase "
            "(train_task's concept_phrase and init_words; train_task_from_file passes the task's)"
        )
    if (task_index == 1) != (previous_state is None):
        raise TrainingError(f"task {task_index}: the previous state must be given exactly when task_index > 1")
    if not fields["train_images"]:
        raise TrainingError(f"task {task_index} ({fields['concept']}): no training images")
    method.check_training_options(config.used_options(), method_key)
    if config.prior_preservation and not (fields.get("class_images") and fields.get("class_prompt")):
        raise TrainingError(
            f"task {task_index} ({fields['concept']}): training.prior_preservation needs the class's images and "
            "prompt (a concept with a class word; train_task's class_images and class_prompt, which the "
            "class_images rule writes); turn training.prior_preservation off for concepts without a class"
        )
    slot = task_index - 1 if slot is None else slot
    method.check_slots(slot + 1, f"{method_key}.num_blocks")
    this_seed = task_seed(fields["seed"], task_index, config.seed_policy)
    return TaskSpec(**fields, this_seed=this_seed, slot=slot, output_dir=Path(output_dir))


def _load_model(task: TaskSpec, config: TrainingConfig, method: ContinualMethod, method_key: str):
    """The base pipeline, the training block with the denoiser family's default targets where it
    names none, the targeted layers (rank checked) and the training images' crops."""
    from lorachain.models.denoisers import check_family_config, denoiser, family_of
    from lorachain.models.loading import load_pipeline

    # bf16 runs load the pipeline in bf16 (FLUX.1-dev in fp32 would need 67 GB to encode the prompt);
    # the VAE stays fp32 for the posteriors, computed once per task
    # (embedding tuning trains text-encoder rows: fp32 then)
    bf16 = config.mixed_precision == "bf16" and method.embeddings is None
    dtype = torch.bfloat16 if bf16 else torch.float32
    pipe = load_pipeline(task.model_source, vae=task.vae, torch_dtype=dtype)
    if dtype != torch.float32:
        pipe.vae.to(torch.float32)
    family = family_of(pipe)
    config = config.with_targets(family.default_targets)
    check_family_config(family, config, method, method_key)
    layers = lora_layers(denoiser(pipe), config.target_modules)
    check_rank(layers, config.rank)
    data_generator = torch.Generator().manual_seed(task.this_seed)
    images = [load_training_image(path, config.resolution, data_generator) for path in task.train_images]
    return pipe, config, layers, images


def _fingerprint(task: TaskSpec, config: TrainingConfig, method: ContinualMethod) -> dict | None:
    """What an in-task checkpoint must have been written by; None when checkpoints are off."""
    if not (config.checkpoint_every and config.steps):
        return None
    return run_fingerprint(
        config=config,
        method=method,
        task_index=task.task_index,
        seed=task.seed,
        this_seed=task.this_seed,
        model_source=task.model_source,
        vae=task.vae,
        train_images=task.train_images,
        train_prompt=task.train_prompt,
        previous_state=task.previous_state,
        run=task.run,
        concept=task.concept,
        slot=task.slot,
        class_images=list(task.class_images) if config.prior_preservation else None,
    )


def _set_up_adapter(unet, method: ContinualMethod, layers, task: TaskSpec, config: TrainingConfig):
    """Fold the previous state into the U-Net (W0 + merged) and let the method initialise the
    new adapter: its factors and the row masks of B."""
    state = fold_state(task.previous_state, method, device="cpu")
    apply_to_unet(unet, state)
    return initial_adapters(method, layers, state, config, task.this_seed, task.slot)


def _add_tokens(pipe, method: ContinualMethod, task: TaskSpec, method_key: str) -> TrainableTokens | None:
    """Embedding tuning's new tokens in the text encoder(s), when the method asks for them."""
    if method.embeddings is None:
        return None
    init_words = task.init_words or task.concept_phrase
    return add_concept_tokens(pipe, method.embeddings, task.concept_phrase, init_words, task.train_prompt, method_key)


def _encode_training_data(
    pipe, images, task: TaskSpec, config: TrainingConfig, device, tokens: TrainableTokens | None = None
) -> TrainingData:
    """Posteriors and prompt embedding once per task, in fp32 (SDXL's VAE overflows in fp16). With
    embedding tuning the prompt (rewritten to the concept token) is encoded again at every step."""
    from lorachain.models.denoisers import family_of
    from lorachain.training.objective import objective_of

    family = family_of(pipe)
    pipe.to(device)
    with torch.no_grad():
        (latent_mean, latent_std), flipped = _posteriors(pipe, images, config.random_flip, device)
        condition = encode_condition(pipe, task.train_prompt if tokens is None else tokens.prompt, device)
    return TrainingData(
        latent_mean=latent_mean,
        latent_std=latent_std,
        family=family,
        condition=condition,
        time_ids=sdxl_time_ids(condition, images, config.resolution, device),
        objective=objective_of(family, pipe.scheduler.config, config.flow_matching),
        guidance=config.guidance,
        count=len(images),
        tokens=tokens,
        seed=task.this_seed,
        flipped=flipped,
        prior=_encode_class_data(pipe, task, config, device) if config.prior_preservation else None,
    )


@torch.no_grad()
def _posteriors(pipe, images, flip: bool, device) -> tuple[tuple, tuple | None]:
    """(mean, std) of the VAE posteriors of the image crops, and (with random_flip) of their mirror
    images: the VAE is not exactly mirror-equivariant, so the mirrored crops are encoded too."""
    pixels = torch.stack([image for image, _, _ in images]).to(device)
    posterior = pipe.vae.encode(pixels).latent_dist
    plain = (posterior.mean.float(), posterior.std.float())
    if not flip:
        return plain, None
    mirrored = pipe.vae.encode(torch.flip(pixels, dims=[-1])).latent_dist
    return plain, (mirrored.mean.float(), mirrored.std.float())


@torch.no_grad()
def _encode_class_data(pipe, task: TaskSpec, config: TrainingConfig, device) -> ClassData:
    """The class images (cropped with their own generator, so the instance crops do not change)
    and the class prompt, encoded once (the class prompt has no trainable token)."""
    generator = torch.Generator().manual_seed(task.this_seed + 3)
    images = [load_training_image(path, config.resolution, generator) for path in task.class_images]
    (mean, std), flipped = _posteriors(pipe, images, config.random_flip, device)
    condition = encode_condition(pipe, task.class_prompt, device)
    return ClassData(
        latent_mean=mean,
        latent_std=std,
        condition=condition,
        time_ids=sdxl_time_ids(condition, images, config.resolution, device),
        count=len(images),
        flipped=flipped,
    )


def _masked_gradient(mask: torch.Tensor):
    """A gradient hook that zeroes the rows outside ``mask`` (bound now, not when the hook runs)."""

    def hook(grad):
        return grad * mask.to(grad.dtype)

    return hook


def _prepare_unet(
    unet,
    adapters,
    row_masks,
    layers,
    method: ContinualMethod,
    task: TaskSpec,
    config: TrainingConfig,
    accelerator,
    tokens: TrainableTokens | None = None,
) -> PreparedUNet:
    """Inject the adapter, make its trained factors the only trainable parameters of the U-Net
    (fp32), hook the row masks and output erasure, and let accelerate prepare the U-Net and the
    optimizer. Embedding tuning's token rows join the optimizer as a second group at their own
    learning rate."""
    device = accelerator.device
    unet.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    unet.to(device) if weight_dtype == torch.float32 else unet.to(device, dtype=weight_dtype)
    lora_config = inject_lora(unet, adapters, config)
    trained_factors = ("lora_B",) if method.freeze_down_projection else ("lora_A", "lora_B")
    trainable = [p for n, p in unet.named_parameters() if any(f".{factor}." in n for factor in trained_factors)]
    for parameter in trainable:
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()  # trainable factors in fp32 under mixed precision
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    named_trainable = [
        (n, p) for n, p in unet.named_parameters() if any(f".{factor}." in n for factor in trained_factors)
    ]
    modules = dict(unet.named_modules())
    for name, mask in row_masks.items():  # rows of B outside the mask get no gradient: they stay 0
        modules[name].lora_B["default"].weight.register_hook(_masked_gradient(mask.to(device)))
    erasure = (
        OutputErasure(unet, list(layers), method.erasure_rate(task.slot), task.this_seed + 2, device)
        if method.erasure_rate(task.slot) > 0
        else None
    )
    token_rows = []
    if tokens is None:
        optimizer = _optimizer(trainable, config)
    else:
        named_tokens = tokens.named_parameters()
        token_rows = [parameter for _, parameter in named_tokens]
        named_trainable += named_tokens
        groups = [{"params": trainable}, {"params": token_rows, "lr": method.embeddings.learning_rate}]
        optimizer = _optimizer(groups, config)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    return PreparedUNet(
        unet=unet,
        optimizer=optimizer,
        accelerator=accelerator,
        weight_dtype=weight_dtype,
        lora_config=lora_config,
        trainable=trainable,
        named_trainable=named_trainable,
        erasure=erasure,
        token_rows=token_rows,
    )


def _restore(
    model: PreparedUNet, fingerprint: dict | None, task: TaskSpec, config: TrainingConfig, timings: dict
) -> Progress:
    """A fresh start, or the in-task checkpoint of this run. After injection, optimizer creation
    and accelerate's prepare: the checkpoint replaces the initial factors, the (empty) optimizer
    state and the generator state in place."""
    progress = Progress(generator=torch.Generator().manual_seed(task.this_seed + 1))
    if fingerprint is None:
        return progress
    resume_started = time.perf_counter()
    checkpoint = load_checkpoint(
        task.resume_dir, fingerprint, model.named_trainable, model.optimizer, progress.generator, config.steps
    )
    if checkpoint is not None:
        progress.start_step, progress.losses = restore_checkpoint(
            checkpoint,
            model.named_trainable,
            model.optimizer,
            model.accelerator.scaler,
            progress.generator,
        )
        log.info(
            "task %d (%s): resuming from the checkpoint at step %d of %d in %s",
            task.task_index,
            task.concept,
            progress.start_step,
            config.steps,
            task.resume_dir,
        )
        del checkpoint
    timings["resume_s"] = time.perf_counter() - resume_started
    return progress


# ------------------------------------------------------------------------------ the loop


def _draw_seed(seed: int, purpose: int, step: int, micro: int) -> int:
    """Seed of a per-(micro-)step draw that must not consume the step generator: random flips and
    peft's dropout. A function of (seed, step) alone, so a resumed run draws the same."""
    return (((seed * 16 + purpose) * 1_000_003 + step) * 64 + micro) % 2**63


def _mirror(mean, std, flipped: tuple | None, indices, flips):
    """The posteriors of the drawn images, mirrored where `flips` says (random_flip)."""
    mean, std = mean[indices], std[indices]
    if flipped is None:
        return mean, std
    where = flips.view(-1, 1, 1, 1).to(mean.device)
    return torch.where(where, flipped[0][indices], mean), torch.where(where, flipped[1][indices], std)


def _denoising_loss(source, indices, flips, condition, data, model, generator, batch_size: int):
    """The family's objective on one batch of `source` (the instance data or the class data):
    epsilon- (or v-) prediction MSE for U-Nets, flow matching for transformers
    (:mod:`lorachain.training.objective`); posterior draws, noises and timesteps drawn from the
    step generator in a fixed order."""
    device = model.accelerator.device
    mean, std = _mirror(source.latent_mean, source.latent_std, source.flipped, indices, flips)
    eps_latent = torch.randn(mean.shape, generator=generator)
    noise = torch.randn(mean.shape, generator=generator)
    timesteps = data.objective.draw_timesteps(batch_size, generator)
    latents = data.family.scaled_latents(mean + std * eps_latent.to(device))
    noise, timesteps = noise.to(device), timesteps.to(device)
    noisy, target, model_timesteps = data.objective.noisy_and_target(latents, noise, timesteps)
    time_ids = None if source.time_ids is None else source.time_ids[indices.to(device)]
    with model.accelerator.autocast():
        prediction = data.family.forward(
            model.unet, noisy, model_timesteps, condition, time_ids, model.weight_dtype, data.guidance
        )
    return data.objective.loss(prediction, target, model_timesteps)


def _step_loss(
    step: int,
    data: TrainingData,
    model: PreparedUNet,
    generator: torch.Generator,
    config: TrainingConfig,
    micro: int = 0,
):
    """The loss of one (micro-)batch: images drawn from the step generator, then their denoising
    loss; with prior preservation plus ``prior_loss_weight`` times the denoising loss of as many
    class images under the class prompt (diffusers' train_dreambooth_lora.py's two terms)."""
    if model.erasure is not None and micro == 0:  # one erasure mask per optimizer step
        model.erasure.begin_step(step)
    if config.lora_dropout:  # peft's nn.Dropout draws from the global generator: seed it per step
        torch.manual_seed(_draw_seed(data.seed, 1, step, micro))
    flip_draws = torch.Generator().manual_seed(_draw_seed(data.seed, 2, step, micro)) if config.random_flip else None
    batch = config.batch_size
    indices = torch.randint(0, data.count, (batch,), generator=generator)
    flips = None if flip_draws is None else torch.rand(batch, generator=flip_draws) < 0.5
    condition = data.condition if data.tokens is None else data.tokens.condition(model.accelerator.device)
    loss = _denoising_loss(data, indices, flips, condition, data, model, generator, batch)
    if data.prior is None:
        return loss
    prior = data.prior
    class_indices = torch.randint(0, prior.count, (batch,), generator=generator)
    class_flips = None if flip_draws is None else torch.rand(batch, generator=flip_draws) < 0.5
    prior_loss = _denoising_loss(prior, class_indices, class_flips, prior.condition, data, model, generator, batch)
    return loss + config.prior_loss_weight * prior_loss


def _accumulated_loss(step: int, data: TrainingData, model: PreparedUNet, generator, config: TrainingConfig):
    """One optimizer step's loss. Without accumulation the loss itself (backpropagated by
    :func:`_optimizer_step`); with ``gradient_accumulation_steps`` k, k micro-batches drawn in turn,
    each backpropagated at 1/k here (so the step's gradient is their mean), and their mean loss,
    detached. A step's micro-batches never straddle a checkpoint, so resume stays bit-identical."""
    steps = config.gradient_accumulation_steps
    if steps == 1:
        return _step_loss(step, data, model, generator, config)
    total = 0.0
    for micro in range(steps):
        loss = _step_loss(step, data, model, generator, config, micro=micro)
        model.accelerator.backward(loss / steps)
        total = total + loss.detach()
    return total / steps


def _optimizer_step(model: PreparedUNet, loss, config: TrainingConfig, track_norm: bool = False) -> float | None:
    """One optimizer step; returns the LoRA factors' gradient norm (before clipping) when clipping
    computes it or `track_norm` asks for it, else None."""
    if loss.requires_grad:  # accumulated micro-batches were backpropagated already
        model.accelerator.backward(loss)
    grad_norm = None
    if config.max_grad_norm:
        grad_norm = model.accelerator.clip_grad_norm_(model.trainable, config.max_grad_norm)
        if model.token_rows:  # clipped on their own: the token rows do not shrink the LoRA's steps
            torch.nn.utils.clip_grad_norm_(model.token_rows, config.max_grad_norm)
    elif track_norm:
        grad_norm = gradient_norm(model.trainable)
    model.optimizer.step()
    if model.lr_schedule is not None:
        model.lr_schedule.step()
    model.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm) if track_norm and grad_norm is not None else None


def _lr_schedule(optimizer, config: TrainingConfig, start_step: int):
    """diffusers' learning-rate schedule (get_scheduler) over the run's optimizer steps, positioned
    at `start_step`: a resumed run's optimizer state holds each group's initial_lr, from which the
    schedule sets the learning rate of that step. None for the constant schedule (nothing changes)."""
    if config.lr_scheduler == "constant":
        return None
    from diffusers.optimization import get_scheduler

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    return get_scheduler(
        config.lr_scheduler,
        optimizer=inner,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.steps,
        last_epoch=start_step - 1,
    )


def _write_checkpoint(checkpoints: CheckpointWriter, done: int, model: PreparedUNet, progress: Progress) -> Path:
    return checkpoints.write(
        step=done,
        losses=progress.losses,
        named_parameters=model.named_trainable,
        optimizer=model.optimizer,
        scaler=model.accelerator.scaler,
        generator=progress.generator,
    )


def _interrupted(
    task: TaskSpec, config: TrainingConfig, signum: int, done: int, path: Path | None
) -> TrainingInterrupted:
    where = (
        f"checkpoint written to {path}; rerun the same job to resume from step {done}"
        if path
        else ("no checkpoint (training.checkpoint_every is 0): a rerun starts from step 0")
    )
    return TrainingInterrupted(
        f"task {task.task_index} ({task.concept}): interrupted by {signal.Signals(signum).name} "
        f"after step {done} of {config.steps}; "
        f"no state was written; {where}",
        step=done,
        checkpoint=path,
    )


def _train_loop(
    task: TaskSpec,
    config: TrainingConfig,
    data: TrainingData,
    model: PreparedUNet,
    progress: Progress,
    checkpoints: CheckpointWriter | None,
    show_progress: bool,
    tracker: StepTracker | None = None,
    loss_log: LossLog | None = None,
) -> None:
    """Steps start_step .. steps - 1. An in-task checkpoint every checkpoint_every steps; SIGTERM
    stops at the end of the current step (after writing one) with :class:`TrainingInterrupted`.
    Each step's loss goes to `loss_log` and, with its learning rate and gradient norm, to `tracker`."""
    bar = progress_bar(
        config.steps,
        f"task {task.task_index} {task.concept or ''}".strip(),
        unit="step",
        disable=not show_progress,
        initial=progress.start_step,
    )
    with deferred_sigterm() as stop, contextlib.closing(bar):
        for step in range(progress.start_step, config.steps):
            loss = _accumulated_loss(step, data, model, progress.generator, config)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"task {task.task_index} ({task.concept}): loss is {loss.item()} at step {step}; "
                    "nothing was written. Lower training.learning_rate or check the data"
                )
            learning_rate = model.optimizer.param_groups[0]["lr"]  # this step's (a schedule steps with it)
            grad_norm = _optimizer_step(model, loss, config, track_norm=tracker is not None and tracker.started)
            progress.losses.append(loss.item())
            _record_step(step, progress.losses[-1], learning_rate, grad_norm, tracker, loss_log)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{progress.losses[-1]:.4f}", refresh=False)
            done = step + 1
            if done < config.steps and stop.signum is not None:  # at the last step: finish instead
                path = _write_checkpoint(checkpoints, done, model, progress) if checkpoints is not None else None
                raise _interrupted(task, config, stop.signum, done, path)
            if checkpoints is not None and done < config.steps and done % config.checkpoint_every == 0:
                _write_checkpoint(checkpoints, done, model, progress)


def _record_step(step: int, loss: float, learning_rate: float, grad_norm, tracker, loss_log) -> None:
    if loss_log is not None:
        loss_log.append(step, loss)
    if tracker is not None:
        tracker.log_step(step, loss, learning_rate, grad_norm)


# ------------------------------------------------------------------------------ results


def _trained_result(
    model: PreparedUNet, layers, row_masks, task: TaskSpec, config: TrainingConfig
) -> dict[str, LayerAdapter]:
    if model.erasure is not None:
        model.erasure.remove()  # training only
    result = trained_adapters(model.accelerator.unwrap_model(model.unet), layers, config.scale)
    for name, mask in row_masks.items():  # exact zeros outside the block, whatever the optimizer did
        result[name] = LayerAdapter(A=result[name].A, B=result[name].B * mask, scale=result[name].scale)
    for name, adapter in result.items():
        if not (torch.isfinite(adapter.A).all() and torch.isfinite(adapter.B).all()):
            raise TrainingError(f"task {task.task_index}: non-finite LoRA weights in {name}; nothing was written")
    return result


def _manifest(
    task: TaskSpec, method: ContinualMethod, config: TrainingConfig, losses: list[float], pipeline_class
) -> dict:
    parent = (
        None
        if task.previous_state is None
        else os.path.relpath(Path(task.previous_state).resolve(), task.output_dir.resolve())
    )
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "task_index": task.task_index,
        "slot": task.slot,
        "concept": task.concept,
        "train_prompt": task.train_prompt,
        "parent": parent,
        "method": {"name": method.name, "params": method.params},
        "run": task.run,
        "base_model": str(task.model_source),
        "architecture": pipeline_class.__name__,
        "rank": config.rank,
        "lora_alpha": config.lora_alpha,
        "target_modules": (
            config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
        ),
        "seed": task.this_seed,
        "steps": config.steps,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_10pct": sum(tail) / len(tail) if tail else None,
        "lora_file": LORA_FILE,
        # transformers' flow-matching settings (a U-Net state has none: it stays byte-identical)
        **_objective_record(config, pipeline_class),
        # the DreamBooth-script options, only those set (a state trained without them is unchanged)
        **({"training_options": _options_record(config, task)} if config.options_set() else {}),
        # versions, code commit and the model's resolved revision: the same on one machine and checkout
        "provenance": provenance.record(task.model_source),
    }


def _objective_record(config: TrainingConfig, pipeline_class) -> dict:
    from lorachain.models.denoisers import denoiser_component

    if denoiser_component(pipeline_class.__name__) != "transformer":
        return {}
    record = {"flow_matching": asdict(config.flow_matching)}
    return record if config.guidance is None else {**record, "guidance": config.guidance}


def _options_record(config: TrainingConfig, task: TaskSpec) -> dict:
    record = {key: value for key, value in config.options_set().items() if key != "target_modules"}
    if config.prior_preservation:
        record["class_prompt"] = task.class_prompt
        record["class_images"] = len(task.class_images)
    return record


# ------------------------------------------------------------------------------ tracking


def _start_tracker(
    accelerator, tracking: TrackingConfig, directory: Path, task: TaskSpec, config: TrainingConfig, method, progress
):
    """The task's trackers, writing in `directory`, started with its hyperparameters (a fresh run
    drops an earlier attempt's files; a resumed one appends to them)."""
    tracker = StepTracker(accelerator, tracking, directory, run_name=task.label)
    hyperparameters = {
        "task_index": task.task_index,
        "concept": task.concept or "",
        "seed": task.this_seed,
        "method": {"name": method.name, "params": method.params},
        "training": asdict(config),
    }
    tracker.start(hyperparameters, fresh=progress.start_step == 0)
    return tracker


def _tracked_loop(task, config, data, model, progress, checkpoints, show_progress, tracker, loss_log) -> None:
    """The loop, writing the losses (to `loss_log`'s live file, when given) as it runs; the trackers
    are closed when it stops with an error (interruption included)."""
    try:
        with LossLog(loss_log, progress.losses) if loss_log else contextlib.nullcontext() as live_log:
            _train_loop(task, config, data, model, progress, checkpoints, show_progress, tracker, live_log)
    except BaseException:
        tracker.end()
        raise


def _end_tracking(tracker: StepTracker, task: TaskSpec, method, config: TrainingConfig, timings: dict) -> None:
    """Validation images of the written state (when asked), then close the trackers."""
    try:
        if tracker.started and tracker.tracking.validation_images:
            from lorachain.sample import load_model_for_sampling

            validation_started = time.perf_counter()
            pipe = load_model_for_sampling(task.model_source, task.vae, task.output_dir, method.name, method.params)
            pipe.to(tracker.accelerator.device)
            tracker.log_images(
                validation_images(pipe, task.train_prompt, tracker.tracking, config.resolution), step=config.steps
            )
            timings["validation_s"] = time.perf_counter() - validation_started
    finally:
        tracker.end()


# ------------------------------------------------------------------------------ one task


def train_task(
    *,
    model_source: str,
    train_images: list[str],
    train_prompt: str,
    task_index: int,
    previous_state: str | Path | None,
    method_name: str,
    method_params: dict,
    training: dict,
    seed: int,
    output_dir: str | Path,
    vae: str | None = None,
    run: dict | None = None,
    concept: str | None = None,
    loss_log: str | Path | None = None,
    progress: bool = True,
    slot: int | None = None,
    concept_phrase: str | None = None,
    init_words: str | None = None,
    class_images: list[str] | None = None,
    class_prompt: str | None = None,
    tracking_dir: str | Path | None = None,
) -> dict:
    """Train task `task_index` on top of `previous_state` and write its state to `output_dir`.
    Returns the manifest written (plus `timings`, `bytes_written` and `resumed_from_step`, which
    are not written). Everything that can be checked is checked before the first step.

    With ``training.checkpoint_every`` > 0, an in-task checkpoint in ``<output_dir>/.resume/`` lets
    a rerun of the same call continue where a killed one stopped (see the module docstring). SIGTERM
    during training stops it at the end of the current step with :class:`TrainingInterrupted`.

    `slot` is the concept slot methods with per-concept structure use (BlockLoRA's row block,
    Orthogonal Adaptation's basis columns): by default task_index - 1; the modular regime passes the
    concept's index in its domain.

    `concept_phrase` (how prompts name the concept: an object's rare token, a style's phrase) and
    `init_words` (the concept's own words: the class word, the style phrase) are what embedding
    tuning needs (:func:`lorachain.embeddings.concept_words` of a task).

    `class_images` (the base model's images of the concept's class, :mod:`lorachain.training.prior`)
    and `class_prompt` ("a photo of a sneaker") are what ``training.prior_preservation`` needs.

    `tracking_dir` is where the trackers write (default: :func:`tracking_directory`, beside
    `output_dir`; the workflow's jobs put them under ``logs/``, since event files hold wall times)."""
    timings = {}
    started = time.perf_counter()
    tracking = TrackingConfig.from_dict(training.get("tracking"))  # how the run is watched, not what it computes
    config = TrainingConfig.from_dict({key: value for key, value in training.items() if key != "tracking"})
    check_tracker(tracking)
    label = (run or {}).get("method", method_name)
    method_key = f"modular.adapters.{label}" if (run or {}).get("regime") == "modular" else f"methods.{label}"
    method = make_method(method_name, method_params, key=method_key)
    task = _checked_task(
        config=config,
        method=method,
        method_key=method_key,
        output_dir=output_dir,
        slot=slot,
        model_source=model_source,
        vae=vae,
        train_images=train_images,
        train_prompt=train_prompt,
        task_index=task_index,
        previous_state=previous_state,
        seed=seed,
        concept=concept,
        run=run or {},
        concept_phrase=concept_phrase,
        init_words=init_words,
        class_images=tuple(class_images or ()),
        class_prompt=class_prompt,
    )
    tracking_dir = Path(tracking_dir) if tracking_dir is not None else tracking_directory(task.output_dir)
    accelerator = _accelerator(config, accelerator_options(tracking, tracking_dir))

    pipe, config, layers, images = _load_model(task, config, method, method_key)
    timings["load_s"] = time.perf_counter() - started
    fingerprint = _fingerprint(task, config, method)
    unet, pipeline_class = denoiser(pipe), type(pipe)
    adapters, row_masks = _set_up_adapter(unet, method, layers, task, config)
    tokens = _add_tokens(pipe, method, task, method_key)
    data = _encode_training_data(pipe, images, task, config, accelerator.device, tokens)
    del pipe  # keep only the denoiser (and, with embedding tuning, the text encoders `tokens` holds)
    model = _prepare_unet(unet, adapters, row_masks, layers, method, task, config, accelerator, tokens)
    del unet, adapters
    state = _restore(model, fingerprint, task, config, timings)
    model.lr_schedule = _lr_schedule(model.optimizer, config, state.start_step)

    checkpoints = None if fingerprint is None else CheckpointWriter(task.resume_dir, fingerprint)
    tracker = _start_tracker(accelerator, tracking, tracking_dir, task, config, method, state)
    train_started = time.perf_counter()
    _tracked_loop(task, config, data, model, state, checkpoints, progress, tracker, loss_log)
    checkpoint_seconds = 0.0 if checkpoints is None else checkpoints.seconds
    timings["train_s"] = time.perf_counter() - train_started - checkpoint_seconds
    timings["checkpoint_s"] = checkpoint_seconds
    timings["checkpoints_written"] = 0 if checkpoints is None else checkpoints.written

    result = _trained_result(model, layers, row_masks, task, config)
    write_started = time.perf_counter()
    if loss_log:
        publish_loss_log(loss_log)  # written during the loop (loss.csv.live): now complete
    manifest = _manifest(task, method, config, state.losses, pipeline_class)
    embeddings = None if tokens is None else tokens.result()
    bytes_written = write_task_state(
        task.output_dir, result, manifest, pipeline_class, model.lora_config, embeddings=embeddings
    )
    shutil.rmtree(task.resume_dir, ignore_errors=True)  # the task is complete: its checkpoint has served
    timings["write_s"] = time.perf_counter() - write_started
    timings["total_s"] = time.perf_counter() - started
    if embeddings is not None:  # the record write_task_state added: token, file, sha256
        manifest["embeddings"] = read_manifest(task.output_dir)["embeddings"]
    _end_tracking(tracker, task, method, config, timings)
    return {**manifest, "bytes_written": bytes_written, "timings": timings, "resumed_from_step": state.start_step}


# ------------------------------------------------------------------------------ jobs


def train_task_from_file(
    *,
    tasks,
    position: int,
    task_index: int,
    previous_state,
    slot: int | None,
    seed: int,
    method: str,
    method_params: dict,
    training: dict,
    checkpoint_every: int,
    model: str,
    vae: str | None,
    run: dict,
    state,
    lora,
    loss,
    class_images=None,
    tracking: dict | None = None,
    tracking_dir=None,
) -> dict:
    """What the train_task and train_concept jobs share: train task `position` (1-based) of the task
    file `tasks` as task `task_index` of a chain and write its state: the manifest `state` and the
    LoRA file `lora` (which must be beside it), the losses to `loss`. `checkpoint_every` joins the training
    block here: how often a job checkpoints does not change its result; so does `tracking` (the
    ``training.tracking`` block: how it is watched). `class_images` is the domain's
    class-image directory (:mod:`lorachain.training.prior`), read with training.prior_preservation.
    Returns a summary."""
    from lorachain.data import read_tasks
    from lorachain.embeddings import concept_words

    if Path(lora) != Path(state).parent / LORA_FILE:
        raise TrainingError(
            f"{lora}: a task's LoRA file is written beside its manifest, as {Path(state).parent / LORA_FILE}"
        )
    task = read_tasks(tasks)[position - 1]
    phrase, init_words = concept_words(task)
    prior = _prior_inputs(task, training, class_images)
    manifest = train_task(
        model_source=model,
        vae=vae,
        train_images=list(task.train_images),
        train_prompt=task.train_prompt,
        task_index=task_index,
        slot=slot,
        previous_state=previous_state,
        method_name=method,
        method_params=dict(method_params),
        training=dict(training, checkpoint_every=checkpoint_every, tracking=tracking or {}),
        seed=seed,
        output_dir=Path(state).parent,
        run=dict(run),
        concept=task.concept,
        loss_log=loss,
        concept_phrase=phrase,
        init_words=init_words,
        tracking_dir=tracking_dir,
        **prior,
    )
    return {key: manifest[key] for key in ("task_index", "slot", "concept", "final_loss", "bytes_written", "timings")}


def _prior_inputs(task, training: dict, class_images) -> dict:
    """train_task's class_images and class_prompt for `task` with training.prior_preservation."""
    from lorachain.training.prior import check_prior_task, class_images_of, class_prompt

    if not training.get("prior_preservation"):
        return {}
    check_prior_task(task)
    if not class_images:
        raise TrainingError(
            "config key training.prior_preservation: no class-image directory was given (the class_images "
            "rule's output, the job's class_images input)"
        )
    if isinstance(class_images, (list, tuple)):  # the rule's input function gives a list of one directory
        (class_images,) = class_images
    count = training.get("num_class_images", TrainingConfig.num_class_images)
    images = class_images_of(class_images, task.class_name, count)
    return {"class_images": images, "class_prompt": class_prompt(task.class_name)}


def train_task_job(
    *,
    tasks,
    task_index: int,
    previous_dir,
    method: str,
    method_params: dict,
    training: dict,
    checkpoint_every: int,
    model: str,
    vae: str | None,
    run: dict,
    seed: int,
    state,
    lora,
    loss,
    class_images=None,
    tracking: dict | None = None,
    tracking_dir=None,
) -> dict:
    """The train_task job: task `task_index` of run `run` (training seed `seed`) on top of the state
    in `previous_dir` (None for task 1)."""
    return train_task_from_file(
        tasks=tasks,
        position=task_index,
        task_index=task_index,
        previous_state=previous_dir,
        slot=None,
        seed=int(seed),
        method=method,
        method_params=method_params,
        training=training,
        checkpoint_every=checkpoint_every,
        model=model,
        vae=vae,
        run=run,
        state=state,
        lora=lora,
        loss=loss,
        class_images=class_images or None,
        tracking=tracking,
        tracking_dir=tracking_dir,
    )
