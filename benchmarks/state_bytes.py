"""Bytes kept per task: a full pipeline save (what the reference does) vs lorachain's task state.

Measured on disk for the tiny SD1 / SDXL pipelines (a full ``save_pretrained`` in fp32
safetensors vs the directory one real ``train_task`` writes; the dense delta column is the fp32
size of the targeted weight matrices, what a task would cost stored as W_t - W0), and computed from the shapes for the
real SDXL base model, whose U-Net is built on the meta device from its published config (no
weights are downloaded or allocated).

Usage: ``python benchmarks/state_bytes.py`` (CPU, under a minute). Prints figures only.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from lorachain.torch_env import torch  # noqa: E402

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
FP32 = 4  # bytes per parameter

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the published values).
SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# Parameter counts of the other SDXL base components (from their published configs/checkpoints):
SDXL_TEXT_ENCODER_PARAMS = 123_060_480  # CLIP ViT-L/14 text model (text_encoder)
SDXL_TEXT_ENCODER_2_PARAMS = 694_659_840  # OpenCLIP ViT-bigG/14 text model + projection (text_encoder_2)
SDXL_VAE_PARAMS = 83_653_863  # AutoencoderKL (vae)
SDXL_LORA_RANK = 64


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def measure_tiny(architecture: str, work: Path) -> dict:
    from lorachain.data import generate_dreambooth_like
    from lorachain.models.tiny import save_tiny_pipeline
    from lorachain.train import train_task

    base = save_tiny_pipeline(architecture, work / f"tiny_{architecture}")
    data = generate_dreambooth_like(work / "data", subjects={"backpack": "backpack"}, images_per_subject=2, size=64)
    images = sorted(str(p) for p in (data / "backpack").glob("*.jpg"))
    task_dir = work / f"state_{architecture}" / "task1"
    train_task(
        model_source=str(base),
        train_images=images,
        train_prompt="a photo of sks backpack",
        task_index=1,
        previous_state=None,
        method_name="merge_init",
        method_params={},
        training=dict(rank=4, lora_alpha=4, steps=2, learning_rate=1e-4, resolution=64, batch_size=1),
        seed=0,
        output_dir=task_dir,
        progress=False,
    )
    from lorachain.models.loading import load_pipeline
    from lorachain.train import lora_layers

    dense = sum(m.weight.numel() for m in lora_layers(load_pipeline(base).unet, TARGET_MODULES).values()) * FP32
    return {
        "full": tree_bytes(base),
        "dense": dense,
        "task": tree_bytes(task_dir),
        "files": sorted(p.name for p in task_dir.iterdir()),
    }


def sdxl_from_shapes() -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    suffixes = tuple("." + name for name in TARGET_MODULES)
    layers = [m for n, m in unet.named_modules() if n.endswith(suffixes) and isinstance(m, torch.nn.Linear)]
    unet_params = sum(p.numel() for p in unet.parameters())
    targeted_weights = sum(m.weight.numel() for m in layers)
    lora_params = sum(SDXL_LORA_RANK * (m.in_features + m.out_features) for m in layers)
    full_params = unet_params + SDXL_TEXT_ENCODER_PARAMS + SDXL_TEXT_ENCODER_2_PARAMS + SDXL_VAE_PARAMS
    return {
        "layers": len(layers),
        "unet_params": unet_params,
        "targeted_weights": targeted_weights,
        "lora_params": lora_params,
        "full_params": full_params,
    }


def main() -> int:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in ("sd1", "sdxl"):
            result = measure_tiny(architecture, Path(tmp))
            rows.append((f"tiny {architecture} (measured)", result["full"], result["dense"], result["task"]))
            print(f"tiny {architecture}: task directory holds {', '.join(result['files'])}")
    real = sdxl_from_shapes()
    rows.append(
        (
            "SDXL base, rank 64 (from shapes)",
            real["full_params"] * FP32,
            real["targeted_weights"] * FP32,
            real["lora_params"] * FP32,
        )
    )

    print()
    print(
        f"SDXL U-Net (meta device): {real['unet_params'] / 1e9:.3f} B parameters; "
        f"{real['layers']} targeted attention projections ({', '.join(TARGET_MODULES)}) "
        f"with {real['targeted_weights'] / 1e6:.1f} M weights; "
        f"rank-{SDXL_LORA_RANK} LoRA: {real['lora_params'] / 1e6:.1f} M parameters"
    )
    print(
        f"full pipeline: U-Net + text encoders ({SDXL_TEXT_ENCODER_PARAMS / 1e6:.0f} M + "
        f"{SDXL_TEXT_ENCODER_2_PARAMS / 1e6:.0f} M) "
        f"+ VAE ({SDXL_VAE_PARAMS / 1e6:.0f} M) = {real['full_params'] / 1e9:.3f} B parameters"
    )
    print()
    header = (
        f"{'model':34} {'full save (fp32)':>17} {'dense delta/task':>17} "
        f"{'LoRA state/task':>16} {'state/full':>11} {'<= 1/10':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, full, dense, task in rows:
        ratio = task / full
        print(
            f"{name:34} {human(full):>17} {human(dense):>17} {human(task):>16} "
            f"{f'1/{full / task:.0f}':>11} {('yes' if ratio <= 0.1 else 'no'):>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
