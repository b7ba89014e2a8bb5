"""Memory and cost figures of real denoisers, computed from their published configs on the meta device.

The configs of SD3.5-medium's and FLUX.1-dev's transformers and SDXL's U-Net are stored in
``reference_configs/`` (sources in its README); :func:`meta_denoiser` builds each with diffusers'
own class on the meta device, so shapes are real and nothing is allocated or downloaded. From the
shapes, :func:`footprint` counts what the README's table reports: parameters, the linear layers a
LoRA targets (``lorachain.training.adapters.targeted``: module-name suffixes, as peft reads a list),
LoRA bytes per task, the bytes of a continual chain's states, and the weight memory of training
and sampling. :func:`measure_fold` times the 10-task fold of a chain with the methods' own ``fold``
on synthetic factors (``benchmarks/transformer_memory.py`` runs it in fresh processes).

Activations are not estimated: they depend on resolution, batch size, attention kernel and
gradient checkpointing, and are better measured on the GPU than guessed.

torch and diffusers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from lorachain.models.denoisers import TRANSFORMER_TARGETS, UNET_TARGETS

# The default LoRA targets are the trainer's (lorachain.models.denoisers): on FLUX the single blocks'
# output projection is the block's fused proj_out, not targeted.
CONFIG_DIR = Path(__file__).with_name("reference_configs")


FP32, BF16 = 4, 2  # bytes per element
ADAMW_STATE_BYTES = {"adamw": 2 * FP32, "adamw8bit": 2}  # exp_avg + exp_avg_sq per trainable parameter
# (bitsandbytes' 8-bit states: one byte each, plus block-wise scales of under 1 %, not counted)
MANIFEST_BYTES = 2_000  # a task's state.json (the demo's are under 1 kB; 2 kB leaves room)
LORA_METADATA_BYTES = 2_000  # the LoRA config diffusers writes into the safetensors header

# Parameter counts of the text encoders and VAEs, counted on the meta device from the published
# configs of the components (tests/test_footprint.py recounts the text encoders).
CLIP_L = 123_060_480  # CLIPTextModel, openai/clip-vit-large-patch14 (SDXL text_encoder, FLUX.1 text_encoder)
CLIP_L_PROJECTION = 123_650_304  # CLIPTextModelWithProjection of the same tower (SD3 text_encoder)
CLIP_G = 694_659_840  # CLIPTextModelWithProjection, OpenCLIP ViT-bigG/14 text tower (SDXL/SD3 text_encoder_2)
T5_XXL_ENCODER = 4_762_310_656  # T5EncoderModel of google/t5-v1_1-xxl (SD3 text_encoder_3, FLUX.1 text_encoder_2)
VAE_16_CHANNELS = 83_819_683  # AutoencoderKL of SD3/SD3.5 and FLUX.1 (16 latent channels, no quant convs)
VAE_SDXL = 83_653_863  # AutoencoderKL of SDXL (4 latent channels)


@dataclass(frozen=True)
class ReferenceModel:
    """A real pipeline whose denoiser is built from its stored config."""

    name: str
    hub_id: str
    config_file: str  # in CONFIG_DIR
    denoiser_class: str  # diffusers class
    denoiser_prefix: str  # the LoRA file's key prefix (diffusers' save_lora_weights)
    targets: tuple[str, ...]
    encoders: tuple[tuple[str, int], ...]  # (name, parameters) of each text encoder
    vae_params: int


REFERENCE_MODELS = {
    model.name: model
    for model in (
        ReferenceModel(
            "sd3.5-medium",
            "stabilityai/stable-diffusion-3.5-medium",
            "sd35_medium_transformer.json",
            "SD3Transformer2DModel",
            "transformer",
            TRANSFORMER_TARGETS,
            (("CLIP-L", CLIP_L_PROJECTION), ("CLIP-G", CLIP_G), ("T5-XXL", T5_XXL_ENCODER)),
            VAE_16_CHANNELS,
        ),
        ReferenceModel(
            "flux.1-dev",
            "black-forest-labs/FLUX.1-dev",
            "flux1_dev_transformer.json",
            "FluxTransformer2DModel",
            "transformer",
            TRANSFORMER_TARGETS,
            (("CLIP-L", CLIP_L), ("T5-XXL", T5_XXL_ENCODER)),
            VAE_16_CHANNELS,
        ),
        ReferenceModel(
            "sdxl-base",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "sdxl_base_unet.json",
            "UNet2DConditionModel",
            "unet",
            UNET_TARGETS,
            (("CLIP-L", CLIP_L), ("CLIP-G", CLIP_G)),
            VAE_SDXL,
        ),
    )
}


def reference_model(name: str) -> ReferenceModel:
    if name not in REFERENCE_MODELS:
        raise KeyError(f"unknown reference model {name!r}; known: {', '.join(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name]


def reference_config(model: ReferenceModel) -> dict:
    """The stored config's model arguments (keys starting with '_' are provenance, not arguments)."""
    config = json.loads((CONFIG_DIR / model.config_file).read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def meta_denoiser(model: ReferenceModel, config: dict | None = None):
    """The denoiser built by its diffusers class on the meta device (shapes only)."""
    import diffusers

    from lorachain.torch_env import torch

    with torch.device("meta"):
        return getattr(diffusers, model.denoiser_class).from_config(config or reference_config(model))


@dataclass(frozen=True)
class TargetedLayer:
    name: str
    out_features: int
    in_features: int


def targeted_layers(denoiser, targets) -> tuple[TargetedLayer, ...]:
    """The linear layers a LoRA with `targets` adapts, as the trainer selects them, by name."""
    from lorachain.torch_env import torch
    from lorachain.training.adapters import targeted

    return tuple(
        TargetedLayer(name, module.out_features, module.in_features)
        for name, module in sorted(denoiser.named_modules())
        if targeted(name, targets) and isinstance(module, torch.nn.Linear)
    )


@dataclass(frozen=True)
class Footprint:
    """What a model costs, from its shapes."""

    model: ReferenceModel
    denoiser_params: int
    denoiser_buffers: int  # elements of persistent buffers (SD3's positional embedding table)
    layers: tuple[TargetedLayer, ...]

    @property
    def targeted_weights(self) -> int:
        return sum(layer.out_features * layer.in_features for layer in self.layers)

    @property
    def encoder_params(self) -> int:
        return sum(count for _, count in self.model.encoders)

    @property
    def denoiser_elements(self) -> int:
        return self.denoiser_params + self.denoiser_buffers

    def lora_params(self, rank: int) -> int:
        """rank * (in + out) per targeted layer: A is (rank, in), B is (out, rank)."""
        return rank * sum(layer.in_features + layer.out_features for layer in self.layers)

    def lora_tensor_bytes(self, rank: int) -> int:
        return FP32 * self.lora_params(rank)  # lorachain writes states' factors in fp32

    def lora_header_bytes(self, rank: int, metadata_bytes: int = LORA_METADATA_BYTES) -> int:
        """The safetensors header: its tensor index as the writer lays it out (compact JSON, padded
        to 8 bytes), plus `metadata_bytes` for the LoRA config in its metadata."""
        index, offset = {}, 0
        for layer in self.layers:
            for factor, shape in (("A", [rank, layer.in_features]), ("B", [layer.out_features, rank])):
                size = FP32 * shape[0] * shape[1]
                index[f"{self.model.denoiser_prefix}.{layer.name}.lora_{factor}.weight"] = {
                    "dtype": "F32",
                    "shape": shape,
                    "data_offsets": [offset, offset + size],
                }
                offset += size
        header = len(json.dumps(index, separators=(",", ":"))) + metadata_bytes
        return 8 + header + (-header % 8)

    def lora_file_bytes(self, rank: int) -> int:
        return self.lora_tensor_bytes(rank) + self.lora_header_bytes(rank)

    def task_state_bytes(self, rank: int) -> int:
        """One task directory of a continual chain: its own LoRA file and manifest (lorachain.state)."""
        return self.lora_file_bytes(rank) + MANIFEST_BYTES

    def chain_state_bytes(self, rank: int, tasks: int) -> int:
        """A chain keeps every task's directory (each state is replayed from its ancestors' files)."""
        return tasks * self.task_state_bytes(rank)

    def weight_bytes(self, bytes_per_element: int = BF16) -> dict[str, int]:
        """The pipeline's weights: denoiser (buffers included), text encoders, VAE."""
        return {
            "denoiser": bytes_per_element * self.denoiser_elements,
            "text_encoders": bytes_per_element * self.encoder_params,
            "vae": bytes_per_element * self.model.vae_params,
        }

    def training_bytes(self, rank: int, optimizer: str = "adamw8bit") -> dict[str, int]:
        """Weight memory of training one task, without activations. The trainer encodes the task's
        images and prompts once with the whole pipeline, then keeps only the denoiser: the peak is
        the larger of the two phases. The LoRA trains in fp32 (factors, gradients, optimizer states)
        on a bf16 denoiser."""
        weights = self.weight_bytes(BF16)
        trainable = self.lora_params(rank)
        lora = FP32 * trainable * 2 + ADAMW_STATE_BYTES[optimizer] * trainable  # factors + grads + states
        encoding = sum(weights.values()) + FP32 * trainable
        steps = weights["denoiser"] + lora
        return {"encoding": encoding, "steps": steps, "lora_and_optimizer": lora, "peak": max(encoding, steps)}

    def sampling_bytes(self) -> int:
        """Weight memory of sampling in bf16, the whole pipeline resident (a state is folded into
        the denoiser's weights: no extra memory). Without activations or CPU offloading."""
        return sum(self.weight_bytes(BF16).values())


def footprint(name: str, config: dict | None = None) -> Footprint:
    """The footprint of a reference model (or of `config` with that model's class and targets)."""
    model = reference_model(name)
    denoiser = meta_denoiser(model, config)
    persistent = denoiser.state_dict()
    parameters = dict(denoiser.named_parameters())
    return Footprint(
        model=model,
        denoiser_params=sum(p.numel() for p in parameters.values()),
        denoiser_buffers=sum(t.numel() for key, t in persistent.items() if key not in parameters),
        layers=targeted_layers(denoiser, model.targets),
    )


# ---------------------------------------------------------------------------------------- folding


def synthetic_chain(layers, rank: int, tasks: int, seed: int = 0):
    """`tasks` tasks' factors of `layers` (Gaussian A and B: values do not change fold cost),
    scale 1 (lora_alpha = rank)."""
    from lorachain.lora import LayerAdapter
    from lorachain.torch_env import torch

    generator = torch.Generator().manual_seed(seed)
    return [
        {
            layer.name: LayerAdapter(
                A=torch.randn(rank, layer.in_features, generator=generator),
                B=torch.randn(layer.out_features, rank, generator=generator),
                scale=1.0,
            )
            for layer in layers
        }
        for _ in range(tasks)
    ]


def fold_chain(method, chain) -> dict:
    """Replay a chain of tasks' factors through ``method.fold`` as ``lorachain.state.fold_state``
    does from the task directories (same order, same dense delta scale * B @ A per layer and task),
    without the files: layer -> the folded dense delta."""
    merged = {}
    for adapters in chain:
        for layer in sorted(adapters):
            folded = method.fold(merged.get(layer), adapters[layer].delta())
            if folded is not None:
                merged[layer] = folded
    return merged


def _rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_fold(groups: dict, method_name: str, rank: int, tasks: int, threads: int, repeats: int = 1) -> dict:
    """Time and memory of folding a `tasks`-task chain of each group of layers (:func:`fold_subset`)
    with a registered method's fold, group after group, the fastest of `repeats` runs (the machine
    may be shared: the fastest is the least disturbed). Meant for a fresh process: the peak is the
    process's resident high-water mark above what it held once the factors existed (the folded
    deltas of every group plus the fold's temporaries)."""
    from lorachain.methods import make_method
    from lorachain.torch_env import torch

    torch.set_num_threads(threads)
    method = make_method(method_name)
    chains = {shape: synthetic_chain(layers, rank, tasks) for shape, layers in groups.items()}
    first = next(iter(groups.values()))[:1]
    fold_chain(method, synthetic_chain(first, rank, 1, seed=1))  # warm-up (kernels, allocator)
    before, load = _rss_bytes(), os.getloadavg()[0]
    seconds, merged = {}, {}
    for shape, chain in chains.items():
        for _ in range(repeats):
            merged.pop(shape, None)
            started = time.perf_counter()
            merged[shape] = fold_chain(method, chain)
            seconds[shape] = min(seconds.get(shape, float("inf")), time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux
    return {
        "seconds": seconds,
        "peak_bytes": max(peak, 0),
        "merged_bytes": sum(FP32 * delta.numel() for deltas in merged.values() for delta in deltas.values()),
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }


# Dense layer-sized temporaries alive at once while one layer is folded, beyond the folded deltas,
# read from the methods' code: the base fold (merge_init, ortho_init) holds delta = scale * (B @ A)
# and the new sum merged + delta (B @ A and its scaled copy, earlier, are two as well); MagMax's
# where(|delta| >= |merged|, delta, merged) holds delta, both abs() results, the bool mask (a
# quarter of a float32 layer) and the result.
FOLD_TEMPORARIES = {"merge_init": 2.0, "magmax": 4.25}


def fold_peak_bytes(layers, rank: int, method_name: str, task_files: bool = True) -> int:
    """Memory of replaying a chain (lorachain.state.fold_state) from the live tensors: the folded
    fp32 delta of every layer, the temporaries of folding the largest layer, and (`task_files`) one
    task's LoRA twice (the file's bytes and the parsed factors). Allocator overhead not included."""
    dense = sum(FP32 * layer.out_features * layer.in_features for layer in layers)
    largest = max(FP32 * layer.out_features * layer.in_features for layer in layers)
    task = sum(FP32 * rank * (layer.in_features + layer.out_features) for layer in layers)
    return int(dense + FOLD_TEMPORARIES[method_name] * largest + (2 * task if task_files else 0))


def fold_subset(layers, per_shape: int) -> dict[tuple[int, int], list[TargetedLayer]]:
    """Up to `per_shape` layers of every distinct (out, in) shape, the first by name: a fold's cost
    per layer depends only on its shape, so the whole model's is the subset's scaled by the count
    of each shape."""
    groups: dict[tuple[int, int], list[TargetedLayer]] = {}
    for layer in layers:
        groups.setdefault((layer.out_features, layer.in_features), []).append(layer)
    return {shape: members[:per_shape] for shape, members in sorted(groups.items())}
