"""One trainer for every continual method (diffusers + peft + accelerate).

A task's job: load the base pipeline, fold the previous task's state into the U-Net (W0 + merged),
let the method initialise the new adapter, train it with plain epsilon-prediction MSE, and write the
task's LoRA and manifest (:mod:`lorachain.state`). Nothing here names a method.

Speed choices that keep the objective unchanged: the training images get one fixed crop each, so
their VAE posteriors (mean, std) are computed once per task and a latent is drawn from them at every
step (what encoding at every step would give); the prompt embedding is computed once per task; the
VAE and text encoders are dropped before the first step.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorachain.methods import ContinualMethod, InitContext, LayerAdapter, make_method
from lorachain.state import LORA_FILE, FoldedState, apply_to_unet, fold_state, write_task_state
from lorachain.torch_env import torch

# Derived per-task seeds: the reference reuses one seed for every task, which makes every fresh A
# identical across tasks. `per_task` gives task t of a run the seed `seed * SEED_STRIDE + t`.
SEED_STRIDE = 1000
SEED_POLICIES = ("per_task", "same")


class TrainingError(RuntimeError):
    """Training cannot start or did not finish; the message names the config key or file."""


@dataclass(frozen=True)
class TrainingConfig:
    rank: int = 4
    lora_alpha: float = 4
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
            raise TrainingError(f"config key training.seed_policy: {config.seed_policy!r} is not one of {SEED_POLICIES}")
        return config

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank


def task_seed(seed: int, task_index: int, policy: str) -> int:
    return seed if policy == "same" else seed * SEED_STRIDE + task_index


# --------------------------------------------------------------------------------------------- data


def load_training_image(path: str | Path, resolution: int, generator: torch.Generator):
    """Short-side resize to `resolution`, one seeded random crop, no flip; values in [-1, 1].
    Returns the tensor, the original (h, w) and the crop's (top, left): SDXL conditions on both."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise TrainingError(f"{path}: cannot decode training image ({error}); replace or remove it") from None
    original = (image.height, image.width)
    factor = resolution / min(image.size)
    size = (max(resolution, round(image.width * factor)), max(resolution, round(image.height * factor)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    top = int(torch.randint(0, image.height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, image.width - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0, original, (top, left)


# ------------------------------------------------------------------------------------ conditioning


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


@torch.no_grad()
def encode_condition(pipe, prompt: str, device) -> dict:
    """U-Net conditioning for one prompt: encoder states, plus SDXL's pooled embedding."""
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}
    embeds, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds}


def unet_kwargs(condition: dict, batch: int, time_ids: torch.Tensor | None, dtype) -> dict:
    kwargs = {"encoder_hidden_states": condition["encoder_hidden_states"].expand(batch, -1, -1).to(dtype)}
    if "text_embeds" in condition:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": condition["text_embeds"].expand(batch, -1).to(dtype),
            "time_ids": time_ids.to(dtype),
        }
    return kwargs


# ----------------------------------------------------------------------------------------- adapter


def lora_layers(unet, target_modules) -> dict[str, torch.nn.Linear]:
    """The targeted linear layers, by module name, in a fixed order."""
    suffixes = tuple("." + name for name in target_modules)
    layers = {name: module for name, module in unet.named_modules() if name.endswith(suffixes) and isinstance(module, torch.nn.Linear)}
    if not layers:
        raise TrainingError(f"config key training.target_modules: {list(target_modules)} match no linear layer of the U-Net")
    return dict(sorted(layers.items()))


def check_rank(layers: dict[str, torch.nn.Linear], rank: int) -> None:
    smallest = min(min(module.in_features, module.out_features) for module in layers.values())
    if rank > smallest:
        name = min(layers, key=lambda n: min(layers[n].in_features, layers[n].out_features))
        raise TrainingError(f"config key training.rank: {rank} exceeds the smallest targeted layer ({name}: {smallest} features); use at most {smallest}")


def initial_adapters(method: ContinualMethod, layers, state: FoldedState, config: TrainingConfig, seed: int) -> dict[str, LayerAdapter]:
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, module in layers.items():
        context = InitContext(
            layer=name, out_features=module.out_features, in_features=module.in_features, rank=config.rank,
            scale=config.scale, tasks_done=state.tasks_done,
            merged=None if state.merged.get(name) is None else state.merged[name].cpu(),
            previous=None if state.adapter is None else state.adapter.get(name),
            generator=generator,
        )
        adapter = method.init_adapter(context)
        if adapter.A.shape != (config.rank, module.in_features) or adapter.B.shape != (module.out_features, config.rank):
            raise RuntimeError(f"{method.name}.init_adapter returned wrong shapes for {name}")
        adapters[name] = adapter
    return adapters


def inject_lora(unet, adapters: dict[str, LayerAdapter], config: TrainingConfig) -> dict:
    """Wrap the targeted layers with peft LoRA and load the method's initial factors."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    lora_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules), init_lora_weights="gaussian")
    unet.add_adapter(lora_config)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, adapter in adapters.items():
            layer = modules[name]
            assert isinstance(layer, LoraLayer), name
            layer.lora_A["default"].weight.copy_(adapter.A)
            layer.lora_B["default"].weight.copy_(adapter.B)
    return lora_config.to_dict()


def trained_adapters(unet, names, scale: float) -> dict[str, LayerAdapter]:
    modules = dict(unet.named_modules())
    return {
        name: LayerAdapter(
            A=modules[name].lora_A["default"].weight.detach().float().cpu().clone(),
            B=modules[name].lora_B["default"].weight.detach().float().cpu().clone(),
            scale=scale,
        )
        for name in names
    }


# ------------------------------------------------------------------------------------------- train


def _optimizer(params, config: TrainingConfig):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise TrainingError("config key training.optimizer.name: adamw8bit needs the bitsandbytes package (GPU); install it or use adamw") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps)
    raise TrainingError(f"config key training.optimizer.name: unknown optimiser {config.optimizer!r}; use adamw or adamw8bit")


def _accelerator(config: TrainingConfig):
    from accelerate import Accelerator

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise TrainingError("config key training.mixed_precision: fp16 needs a CUDA GPU; use 'no' (or 'bf16') on a CPU")
    return Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())


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
) -> dict:
    """Train task `task_index` on top of `previous_state` and write its state to `output_dir`.
    Returns the manifest written. Everything that can be checked is checked before the first step."""
    timings = {}
    started = time.perf_counter()
    config = TrainingConfig.from_dict(training)
    method = make_method(method_name, method_params, key=f"methods.{(run or {}).get('method', method_name)}")
    if (task_index == 1) != (previous_state is None):
        raise TrainingError(f"task {task_index}: the previous state must be given exactly when task_index > 1")
    if not train_images:
        raise TrainingError(f"task {task_index} ({concept}): no training images")
    accelerator = _accelerator(config)
    device = accelerator.device
    this_seed = task_seed(seed, task_index, config.seed_policy)

    from lorachain.models.loading import load_pipeline

    pipe = load_pipeline(model_source, vae=vae)
    unet = pipe.unet
    layers = lora_layers(unet, config.target_modules)
    check_rank(layers, config.rank)

    data_generator = torch.Generator().manual_seed(this_seed)
    images = [load_training_image(path, config.resolution, data_generator) for path in train_images]
    timings["load_s"] = time.perf_counter() - started

    state = fold_state(previous_state, method, device="cpu")
    apply_to_unet(unet, state)
    adapters = initial_adapters(method, layers, state, config, this_seed)
    del state

    # Posteriors and prompt embedding once per task, in fp32 (SDXL's VAE overflows in fp16).
    pipe.to(device)
    with torch.no_grad():
        pixels = torch.stack([image for image, _, _ in images]).to(device)
        posterior = pipe.vae.encode(pixels).latent_dist
        latent_mean, latent_std = posterior.mean.float(), posterior.std.float()
        condition = encode_condition(pipe, train_prompt, device)
    time_ids = None
    if "text_embeds" in condition:
        time_ids = torch.tensor([[*original, *crop, config.resolution, config.resolution] for _, original, crop in images], dtype=torch.float32, device=device)
    scaling_factor = pipe.vae.config.scaling_factor
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipeline_class = type(pipe)
    del pipe, posterior, pixels  # keep only the U-Net
    unet.requires_grad_(False)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    unet.to(device) if weight_dtype == torch.float32 else unet.to(device, dtype=weight_dtype)
    lora_config = inject_lora(unet, adapters, config)
    trainable = [p for n, p in unet.named_parameters() if "lora_" in n]
    for parameter in trainable:
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()  # trainable factors in fp32 under mixed precision
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = _optimizer(trainable, config)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()

    step_generator = torch.Generator().manual_seed(this_seed + 1)
    losses = []
    train_started = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(config.steps), desc=f"task {task_index} {concept or ''}".strip(), file=sys.stderr, disable=not progress, mininterval=2.0)
    for step in bar:
        indices = torch.randint(0, len(images), (config.batch_size,), generator=step_generator)
        eps_latent = torch.randn(latent_mean[indices].shape, generator=step_generator)
        noise = torch.randn(latent_mean[indices].shape, generator=step_generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=step_generator)
        latents = (latent_mean[indices] + latent_std[indices] * eps_latent.to(device)) * scaling_factor
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        kwargs = unet_kwargs(condition, config.batch_size, None if time_ids is None else time_ids[indices.to(device)], weight_dtype)
        with accelerator.autocast():
            prediction = unet(noisy.to(weight_dtype), timesteps, **kwargs).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        if not torch.isfinite(loss):
            raise TrainingError(f"task {task_index} ({concept}): loss is {loss.item()} at step {step}; nothing was written. Lower training.learning_rate or check the data")
        accelerator.backward(loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    timings["train_s"] = time.perf_counter() - train_started

    result = trained_adapters(accelerator.unwrap_model(unet), layers, config.scale)
    for name, adapter in result.items():
        if not (torch.isfinite(adapter.A).all() and torch.isfinite(adapter.B).all()):
            raise TrainingError(f"task {task_index}: non-finite LoRA weights in {name}; nothing was written")

    write_started = time.perf_counter()
    output_dir = Path(output_dir)
    if loss_log:
        loss_log = Path(loss_log)
        loss_log.parent.mkdir(parents=True, exist_ok=True)
        with open(loss_log, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss"])
            writer.writerows((i, f"{value:.6g}") for i, value in enumerate(losses))
    parent = None if previous_state is None else os.path.relpath(Path(previous_state).resolve(), output_dir.resolve())
    tail = losses[-max(1, len(losses) // 10):]
    manifest = {
        "task_index": task_index,
        "concept": concept,
        "train_prompt": train_prompt,
        "parent": parent,
        "method": {"name": method.name, "params": method.params},
        "run": run or {},
        "base_model": str(model_source),
        "architecture": pipeline_class.__name__,
        "rank": config.rank,
        "lora_alpha": config.lora_alpha,
        "target_modules": list(config.target_modules),
        "seed": this_seed,
        "steps": config.steps,
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_10pct": sum(tail) / len(tail) if tail else None,
        "lora_file": LORA_FILE,
    }
    bytes_written = write_task_state(output_dir, result, manifest, pipeline_class, lora_config)
    timings["write_s"] = time.perf_counter() - write_started
    timings["total_s"] = time.perf_counter() - started
    manifest["bytes_written"] = bytes_written
    manifest["timings"] = timings
    return manifest
