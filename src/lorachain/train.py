"""One trainer for every continual method (diffusers + peft + accelerate).

A task's job: load the base pipeline, fold the previous task's state into the U-Net (W0 + merged),
let the method initialise the new adapter, train it with plain epsilon-prediction MSE, and write the
task's LoRA and manifest (:mod:`lorachain.state`). Nothing here names a method.

Speed choices that keep the objective unchanged: the training images get one fixed crop each, so
their VAE posteriors (mean, std) are computed once per task and a latent is drawn from them at every
step (what encoding at every step would give); the prompt embedding is computed once per task; the
VAE and text encoders are dropped before the first step.

Preemption (SLURM requeue, walltime, a Snakemake retry): every ``training.checkpoint_every`` steps,
and at the end of the step during which SIGTERM arrives, the trainer writes an in-task checkpoint to
``<task dir>/.resume/checkpoint.safetensors`` (not a declared output, so a retry keeps it): the LoRA
factors, the optimizer (and grad-scaler) state, the losses so far and the state of the step
generator as tensors, with the step, the optimizer's hyperparameters and a fingerprint of the run as
JSON in the file's metadata (no pickle anywhere). A rerun of the same call continues from it and ends bit-identical to an
uninterrupted run (the crops, posteriors and prompt embedding are recomputed deterministically); a
checkpoint of another configuration is logged and deleted. ``.resume/`` goes once the state is written.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lorachain.methods import ContinualMethod, InitContext, LayerAdapter, make_method
from lorachain.state import LORA_FILE, STATE_FILE, FoldedState, apply_to_unet, fold_state, read_chain, write_task_state
from lorachain.files import sha256_file
from lorachain.torch_env import torch

# Derived per-task seeds: the reference reuses one seed for every task, which makes every fresh A
# identical across tasks. `per_task` gives task t of a run the seed `seed * SEED_STRIDE + t`.
SEED_STRIDE = 1000
SEED_POLICIES = ("per_task", "same")

# In-task checkpoints (resume after preemption): <task dir>/.resume/checkpoint.safetensors.
RESUME_DIR = ".resume"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 2  # 2: safetensors + JSON metadata (1 was a torch.save pickle)
_CHECKPOINT_METADATA = "lorachain_checkpoint"
# Fields that do not change what is computed: a checkpoint stays valid when they change.
_NOT_FINGERPRINTED = ("checkpoint_every",)

log = logging.getLogger(__name__)


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
            raise TrainingError(f"config key training.seed_policy: {config.seed_policy!r} is not one of {SEED_POLICIES}")
        if isinstance(config.checkpoint_every, bool) or not isinstance(config.checkpoint_every, int) or config.checkpoint_every < 0:
            raise TrainingError(f"config key training.checkpoint_every: {config.checkpoint_every!r} is not an integer >= 0 (0 disables in-task checkpoints)")
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


def initial_adapters(
    method: ContinualMethod, layers, state: FoldedState, config: TrainingConfig, seed: int, slot: int
) -> tuple[dict[str, LayerAdapter], dict[str, torch.Tensor]]:
    """The method's initial factors of every layer, and the row masks of B it asks for."""
    generator = torch.Generator().manual_seed(seed)
    adapters, row_masks = {}, {}
    for name, module in layers.items():
        context = InitContext(
            layer=name, out_features=module.out_features, in_features=module.in_features, rank=config.rank,
            scale=config.scale, tasks_done=state.tasks_done,
            merged=None if state.merged.get(name) is None else state.merged[name].cpu(),
            previous=None if state.adapter is None else state.adapter.get(name),
            generator=generator, slot=slot,
        )
        adapter = method.init_adapter(context)
        if adapter.A.shape != (config.rank, module.in_features) or adapter.B.shape != (module.out_features, config.rank):
            raise RuntimeError(f"{method.name}.init_adapter returned wrong shapes for {name}")
        mask = method.row_mask(context)
        if mask is not None:
            row_masks[name] = mask
            adapter = LayerAdapter(A=adapter.A, B=adapter.B * mask, scale=adapter.scale)
        adapters[name] = adapter
    return adapters, row_masks


class OutputErasure:
    """Randomized output erasure (training only): the LoRA branch's output features of every layer
    are multiplied by a fresh Bernoulli(1 - rate) mask at every step. The masks of a step derive from
    (seed, step) alone, so a resumed run and gradient checkpointing's recomputation see the same ones."""

    def __init__(self, unet, names, rate: float, seed: int, device):
        self.rate, self.seed, self.device = rate, seed, device
        modules = dict(unet.named_modules())
        self.sizes = {name: modules[name].out_features for name in names}
        self.masks: dict[str, torch.Tensor] = {}
        self.handles = [
            modules[name].lora_B["default"].register_forward_hook(lambda module, args, output, name=name: output * self.masks[name].to(output.dtype))
            for name in names
        ]

    def begin_step(self, step: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draws = (torch.rand(sum(self.sizes.values()), generator=generator) >= self.rate).float().to(self.device)
        self.masks = dict(zip(self.sizes, torch.split(draws, list(self.sizes.values()))))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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


# ------------------------------------------------------------------------------ resume checkpoints


def run_fingerprint(
    *, config: TrainingConfig, method: ContinualMethod, task_index: int, seed: int, this_seed: int, model_source, vae,
    train_images, train_prompt: str, previous_state, run: dict | None, concept: str | None, slot: int = 0,
) -> dict:
    """What a task's training computes, as JSON: an in-task checkpoint is used only by the same run.
    The previous state enters through the bytes of every manifest of its chain and of its LoRA
    file, the training images through their bytes (a moved dataset still matches)."""
    training = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_FINGERPRINTED}
    previous = None
    if previous_state is not None:
        previous = {
            "chain": [hashlib.sha256((directory / STATE_FILE).read_bytes()).hexdigest() for directory, _ in read_chain(previous_state)],
            "lora": sha256_file(Path(previous_state) / LORA_FILE),
        }
    fingerprint = {
        "format": CHECKPOINT_FORMAT,
        "task_index": task_index,
        "seed": seed,
        "task_seed": this_seed,
        "method": {"name": method.name, "params": method.params},
        "model_source": str(model_source),
        "vae": None if vae is None else str(vae),
        "training": training,
        "train_prompt": train_prompt,
        "train_images": [sha256_file(path) for path in train_images],
        "previous_state": previous,
        "run": run or {},
        "concept": concept,
        "slot": slot,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))  # as it reads back


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _checkpoint_tensors_and_json(payload: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a checkpoint payload into safetensors tensors and a JSON document that names them."""
    tensors = {"losses": payload["losses"], "generator": payload["generator"]}
    tensors.update({f"lora/{name}": value for name, value in payload["lora"].items()})
    optimizer = payload["optimizer"]
    state = {}
    for index, entry in optimizer["state"].items():
        state[str(index)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
                state[str(index)][key] = {"tensor": f"optimizer/{index}/{key}"}
            else:
                state[str(index)][key] = {"value": value}
    document = {
        "format": payload["format"],
        "fingerprint": payload["fingerprint"],
        "step": payload["step"],
        "lora": sorted(payload["lora"]),
        "optimizer": {"state": state, "param_groups": optimizer["param_groups"]},
        "scaler": payload["scaler"],
    }
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}, document


def save_checkpoint(resume_dir: Path, payload: dict) -> Path:
    """Write the checkpoint atomically (a temporary file, flushed to disk, then renamed over the old
    one) as one safetensors file whose metadata holds the JSON part."""
    from safetensors.torch import save

    resume_dir.mkdir(parents=True, exist_ok=True)
    path = resume_dir / CHECKPOINT_FILE
    temporary = resume_dir / f".{CHECKPOINT_FILE}.tmp{os.getpid()}"
    tensors, document = _checkpoint_tensors_and_json(payload)
    data = save(tensors, metadata={_CHECKPOINT_METADATA: json.dumps(document, sort_keys=True)})
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(resume_dir)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """An in-task checkpoint as the payload it was written from (raises on an unreadable file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        document = json.loads((handle.metadata() or {})[_CHECKPOINT_METADATA])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state = {
        int(index): {key: tensors[item["tensor"]] if "tensor" in item else item["value"] for key, item in entry.items()}
        for index, entry in document["optimizer"]["state"].items()
    }
    return {
        "format": document["format"],
        "fingerprint": document["fingerprint"],
        "step": document["step"],
        "losses": tensors["losses"],
        "lora": {name: tensors[f"lora/{name}"] for name in document["lora"]},
        "optimizer": {"state": state, "param_groups": document["optimizer"]["param_groups"]},
        "scaler": document["scaler"],
        "generator": tensors["generator"],
    }


def _checkpoint_problem(checkpoint: dict, fingerprint: dict, named_parameters, optimizer, generator_state, steps: int) -> str | None:
    """Why `checkpoint` cannot continue this run (None: it can). Checked in full before anything
    is loaded, so a refused checkpoint leaves the fresh run untouched."""
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        return f"checkpoint format {checkpoint.get('format') if isinstance(checkpoint, dict) else None!r}, this lorachain writes {CHECKPOINT_FORMAT}"
    try:
        theirs = json.loads(checkpoint["fingerprint"])
    except (KeyError, TypeError, json.JSONDecodeError):
        return "no readable fingerprint"
    if theirs != fingerprint:
        differ = sorted(key for key in set(theirs) | set(fingerprint) if theirs.get(key) != fingerprint.get(key))
        return f"written by another configuration (differs in: {', '.join(differ)})"
    step, losses = checkpoint.get("step"), checkpoint.get("losses")
    if not isinstance(step, int) or not 0 <= step <= steps:
        return f"step {step!r} outside 0..{steps}"
    if not isinstance(losses, torch.Tensor) or losses.shape != (step,):
        return "losses do not match the step"
    lora = checkpoint.get("lora")
    if not isinstance(lora, dict) or sorted(lora) != sorted(name for name, _ in named_parameters):
        return "its LoRA parameters are not this U-Net's"
    for name, parameter in named_parameters:
        if not isinstance(lora[name], torch.Tensor) or lora[name].shape != parameter.shape or lora[name].dtype != parameter.dtype:
            return f"parameter {name} has another shape or dtype"
    state = checkpoint.get("optimizer")
    if not isinstance(state, dict) or len(state.get("param_groups", ())) != len(optimizer.param_groups):
        return "optimizer state of another optimizer"
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in optimizer.param_groups]:
        return "optimizer state of other parameters"
    for index, entry in state.get("state", {}).items():
        if index not in ids:
            return "optimizer state of other parameters"
        parameter = flat[ids.index(index)]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and key.startswith("exp_avg") and value.shape != parameter.shape:
                return f"optimizer state {key} of another shape"
    generator = checkpoint.get("generator")
    if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8 or generator.shape != generator_state.shape:
        return "no step-generator state"
    return None


def load_checkpoint(resume_dir: Path, fingerprint: dict, named_parameters, optimizer, generator: torch.Generator, steps: int) -> dict | None:
    """The checkpoint in `resume_dir` if it continues this run; any other one is logged and deleted."""
    path = resume_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        checkpoint = read_checkpoint(path)
    except Exception as error:  # a truncated or foreign file: start afresh rather than fail the job
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        problem = _checkpoint_problem(checkpoint, fingerprint, named_parameters, optimizer, generator.get_state(), steps)
    if problem is not None:
        log.warning("%s: ignoring the in-task checkpoint: %s; deleting it and training from step 0", path, problem)
        shutil.rmtree(resume_dir, ignore_errors=True)
        return None
    return checkpoint


@contextlib.contextmanager
def deferred_sigterm():
    """While active, SIGTERM only sets `.signum` of the yielded object (the training loop checks it
    at the end of each step); the previous handler comes back afterwards. Signal handlers can only
    be installed from the main thread: elsewhere SIGTERM keeps its handler."""

    class Request:
        signum: int | None = None

        def __call__(self, signum, frame):
            self.signum = signum

    request = Request()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.signal(signal.SIGTERM, request)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


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
) -> dict:
    """Train task `task_index` on top of `previous_state` and write its state to `output_dir`.
    Returns the manifest written (plus `timings`, `bytes_written` and `resumed_from_step`, which
    are not written). Everything that can be checked is checked before the first step.

    With ``training.checkpoint_every`` > 0, an in-task checkpoint in ``<output_dir>/.resume/`` lets
    a rerun of the same call continue where a killed one stopped (see the module docstring). SIGTERM
    during training stops it at the end of the current step with :class:`TrainingInterrupted`.

    `slot` is the concept slot methods with per-concept structure use (BlockLoRA's row block,
    Orthogonal Adaptation's basis columns): by default task_index - 1; the modular regime passes the
    concept's index in its domain."""
    timings = {}
    started = time.perf_counter()
    config = TrainingConfig.from_dict(training)
    method = make_method(method_name, method_params, key=f"methods.{(run or {}).get('method', method_name)}")
    if (task_index == 1) != (previous_state is None):
        raise TrainingError(f"task {task_index}: the previous state must be given exactly when task_index > 1")
    if not train_images:
        raise TrainingError(f"task {task_index} ({concept}): no training images")
    slot = task_index - 1 if slot is None else slot
    method.check_slots(slot + 1, f"methods.{(run or {}).get('method', method_name)}.num_blocks")
    accelerator = _accelerator(config)
    device = accelerator.device
    this_seed = task_seed(seed, task_index, config.seed_policy)
    output_dir = Path(output_dir)
    resume_dir = output_dir / RESUME_DIR

    from lorachain.models.loading import load_pipeline

    pipe = load_pipeline(model_source, vae=vae)
    unet = pipe.unet
    layers = lora_layers(unet, config.target_modules)
    check_rank(layers, config.rank)

    data_generator = torch.Generator().manual_seed(this_seed)
    images = [load_training_image(path, config.resolution, data_generator) for path in train_images]
    timings["load_s"] = time.perf_counter() - started

    fingerprint = None  # what an in-task checkpoint must have been written by
    if config.checkpoint_every and config.steps:
        fingerprint = run_fingerprint(
            config=config, method=method, task_index=task_index, seed=seed, this_seed=this_seed, model_source=model_source, vae=vae,
            train_images=train_images, train_prompt=train_prompt, previous_state=previous_state, run=run, concept=concept, slot=slot,
        )

    state = fold_state(previous_state, method, device="cpu")
    apply_to_unet(unet, state)
    adapters, row_masks = initial_adapters(method, layers, state, config, this_seed, slot)
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
    trained_factors = ("lora_B",) if method.freeze_down_projection else ("lora_A", "lora_B")
    trainable = [p for n, p in unet.named_parameters() if any(f".{factor}." in n for factor in trained_factors)]
    for parameter in trainable:
        parameter.requires_grad_(True)
        parameter.data = parameter.data.float()  # trainable factors in fp32 under mixed precision
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    named_trainable = [(n, p) for n, p in unet.named_parameters() if any(f".{factor}." in n for factor in trained_factors)]
    modules = dict(unet.named_modules())
    for name, mask in row_masks.items():  # rows of B outside the mask get no gradient: they stay 0
        modules[name].lora_B["default"].weight.register_hook(lambda grad, mask=mask.to(device): grad * mask.to(grad.dtype))
    erasure = OutputErasure(unet, list(layers), method.erasure_rate(), this_seed + 2, device) if method.erasure_rate() > 0 else None
    optimizer = _optimizer(trainable, config)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()

    step_generator = torch.Generator().manual_seed(this_seed + 1)
    losses = []
    start_step = 0
    if fingerprint is not None:
        # After injection, optimizer creation and accelerate's prepare: the checkpoint replaces the
        # initial factors, the (empty) optimizer state and the generator state in place.
        resume_started = time.perf_counter()
        checkpoint = load_checkpoint(resume_dir, fingerprint, named_trainable, optimizer, step_generator, config.steps)
        if checkpoint is not None:
            with torch.no_grad():
                for name, parameter in named_trainable:
                    parameter.copy_(checkpoint["lora"][name])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if accelerator.scaler is not None and checkpoint.get("scaler"):
                accelerator.scaler.load_state_dict(checkpoint["scaler"])
            step_generator.set_state(checkpoint["generator"])
            start_step, losses = checkpoint["step"], checkpoint["losses"].tolist()
            log.info("task %d (%s): resuming from the checkpoint at step %d of %d in %s", task_index, concept, start_step, config.steps, resume_dir)
            del checkpoint
        timings["resume_s"] = time.perf_counter() - resume_started

    checkpoint_seconds, checkpoints_written = 0.0, 0

    def write_checkpoint(done: int) -> Path:
        nonlocal checkpoint_seconds, checkpoints_written
        begun = time.perf_counter()
        path = save_checkpoint(resume_dir, {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "step": done,
            "losses": torch.tensor(losses, dtype=torch.float64),
            "lora": {name: parameter.detach().cpu() for name, parameter in named_trainable},
            "optimizer": optimizer.state_dict(),
            "scaler": None if accelerator.scaler is None else accelerator.scaler.state_dict(),
            "generator": step_generator.get_state(),
        })
        checkpoint_seconds += time.perf_counter() - begun
        checkpoints_written += 1
        return path

    train_started = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(
        range(start_step, config.steps), initial=start_step, total=config.steps,
        desc=f"task {task_index} {concept or ''}".strip(), file=sys.stderr, disable=not progress, mininterval=2.0,
    )
    with deferred_sigterm() as stop, contextlib.closing(bar):
        for step in bar:
            if erasure is not None:
                erasure.begin_step(step)
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
            done = step + 1
            if done < config.steps and stop.signum is not None:  # at the last step: finish instead
                path = write_checkpoint(done) if fingerprint is not None else None
                where = f"checkpoint written to {path}; rerun the same job to resume from step {done}" if path else (
                    "no checkpoint (training.checkpoint_every is 0): a rerun starts from step 0"
                )
                raise TrainingInterrupted(
                    f"task {task_index} ({concept}): interrupted by {signal.Signals(stop.signum).name} after step {done} of {config.steps}; "
                    f"no state was written; {where}",
                    step=done, checkpoint=path,
                )
            if fingerprint is not None and done < config.steps and done % config.checkpoint_every == 0:
                write_checkpoint(done)
    timings["train_s"] = time.perf_counter() - train_started - checkpoint_seconds
    timings["checkpoint_s"] = checkpoint_seconds
    timings["checkpoints_written"] = checkpoints_written

    if erasure is not None:
        erasure.remove()  # training only
    result = trained_adapters(accelerator.unwrap_model(unet), layers, config.scale)
    for name, mask in row_masks.items():  # exact zeros outside the block, whatever the optimizer did
        result[name] = LayerAdapter(A=result[name].A, B=result[name].B * mask, scale=result[name].scale)
    for name, adapter in result.items():
        if not (torch.isfinite(adapter.A).all() and torch.isfinite(adapter.B).all()):
            raise TrainingError(f"task {task_index}: non-finite LoRA weights in {name}; nothing was written")

    write_started = time.perf_counter()
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
        "slot": slot,
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
    shutil.rmtree(resume_dir, ignore_errors=True)  # the task is complete: its checkpoint has served
    timings["write_s"] = time.perf_counter() - write_started
    timings["total_s"] = time.perf_counter() - started
    manifest["bytes_written"] = bytes_written
    manifest["timings"] = timings
    manifest["resumed_from_step"] = start_step
    return manifest
