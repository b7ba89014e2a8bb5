"""Tiny SD-1.x-style and SDXL-style pipelines built from config with diffusers' own classes.

They have the real architectures' structure (cross-attention U-Net with to_q/to_k/to_v/to_out.0,
an 8x-downsampling KL VAE, CLIP text encoder(s) with the real BPE tokenizer, SDXL's second text
encoder with projection and its text-time conditioning), only narrow and shallow, with seeded
random weights. The demo and the tests train and sample them on a CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

from lorachain.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer
from lorachain.torch_env import torch

TINY_ARCHITECTURES = ("sd1", "sdxl")

# Sizes: 32/64 U-Net channels allow LoRA ranks up to 32; 64 px images make 8x8 latents.
_TEXT_HIDDEN = 32
_ADDITION_TIME_EMBED_DIM = 8
SD_SCHEDULER = dict(  # Stable Diffusion's training schedule
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)


def text_config(**overrides):
    """The tiny CLIP text encoder's config (the real vocabulary, 32 wide, 2 layers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=_TEXT_HIDDEN,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
        **overrides,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        block_out_channels=(16, 32, 32, 32),  # four blocks: three 2x downsamplings = 8x, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def unet(cross_attention_dim: int, sample_size: int = 8, **sdxl_conditioning):
    """The tiny cross-attention U-Net (32/64 channels); `sample_size` is the latent size."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=16,
        attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        **sdxl_conditioning,
    )


def build_tiny_vae(seed: int = 0):
    """The tiny pipelines' VAE class and layout, seeded on its own (a stand-in for a replacement
    VAE such as SDXL's fp16-fix one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _vae()


def build_tiny_pipeline(architecture: str, seed: int = 0):
    """A randomly initialised pipeline of the given architecture ("sd1" or "sdxl")."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {TINY_ARCHITECTURES}")
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER)
    tokenizer = build_clip_tokenizer()
    if architecture == "sd1":
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(text_config()),
            tokenizer=tokenizer,
            unet=unet(cross_attention_dim=_TEXT_HIDDEN),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # SDXL: the U-Net attends to both encoders' penultimate states concatenated, and is conditioned
    # on the second encoder's pooled projection plus six size/crop numbers (text_time).
    sdxl_unet = unet(
        cross_attention_dim=2 * _TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * _ADDITION_TIME_EMBED_DIM + _TEXT_HIDDEN,
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(text_config()),
        text_encoder_2=CLIPTextModelWithProjection(text_config()),
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=sdxl_unet,
        scheduler=scheduler,
    )


def save_tiny_pipeline(architecture: str, output_dir: str | Path, seed: int = 0, config_key: str | None = None) -> Path:
    """Write the pipeline with save_pretrained. `config_key`: the workflow built it for this key
    (model.tiny), recorded so that a load error can say so and how to rebuild it."""
    output_dir = Path(output_dir)
    build_tiny_pipeline(architecture, seed=seed).save_pretrained(output_dir, safe_serialization=True)
    if config_key is not None:
        from lorachain.files import write_built_marker

        write_built_marker(output_dir, config_key, architecture=architecture, seed=seed)
    return output_dir


def build_tiny_model_job(*, architecture: str, seed: int, output_dir) -> None:
    """The build_tiny_model job: the tiny pipeline of `architecture` (config key model.tiny)."""
    save_tiny_pipeline(architecture, output_dir, seed=seed, config_key="model.tiny")
