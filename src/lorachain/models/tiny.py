"""Tiny SD-1.x, SDXL, SD3 and FLUX.1 pipelines built from config with diffusers' own classes.

They have the real architectures' structure (cross-attention U-Net with to_q/to_k/to_v/to_out.0,
an 8x-downsampling KL VAE, CLIP text encoder(s) with the real BPE tokenizer, SDXL's second text
encoder with projection and its text-time conditioning; SD3.5's and FLUX.1's diffusion transformers
with a 16-channel VAE, a T5 encoder and flow-matching schedulers), only narrow and shallow, with
seeded random weights. The demo and the tests train and sample them on a CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

from lorachain.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer
from lorachain.torch_env import torch

TINY_ARCHITECTURES = ("sd1", "sdxl", "sd3", "flux", "flux_schnell")
TRANSFORMER_ARCHITECTURES = ("sd3", "flux", "flux_schnell")

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


def _vae(latent_channels: int = 4, scaling_factor: float = 0.18215, **flow_vae):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=16,
        block_out_channels=(16, 32, 32, 32),  # four blocks: three 2x downsamplings = 8x, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=64,
        scaling_factor=scaling_factor,
        **flow_vae,
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
    """A randomly initialised pipeline of the given architecture (one of TINY_ARCHITECTURES)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {TINY_ARCHITECTURES}")
    if architecture in TRANSFORMER_ARCHITECTURES:  # their own branch: SD1/SDXL's weights stay as they were
        return _build_sd3_pipeline(seed) if architecture == "sd3" else _build_flux_pipeline(architecture, seed)
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


# ------------------------------------------------------------------- diffusion transformers
# SD3.5 and FLUX.1 share a 16-channel 8x VAE (without the 1x1 quant convs) and a T5 encoder. The
# tiny T5 is twice as wide as SD3's two CLIP encoders together, as the real one (4096 vs 768 + 1280),
# so SD3's encode_prompt zero-pads the CLIP states to its width as it does for the real models.
_T5_WIDTH = 4 * _TEXT_HIDDEN
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,  # the shift grows with the image's token count (mu)
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def _flow_vae(vae_factors: dict):
    return _vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **vae_factors)


def t5_encoder(vocab_size: int):
    """The tiny T5 v1.1-style encoder (gated GELU, no tied embeddings), 2 layers."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=_T5_WIDTH,
        d_kv=32,
        d_ff=2 * _T5_WIDTH,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,  # a built (not loaded) pipeline is in train mode: it must sample deterministically
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def sd3_transformer():
    """SD3.5-medium's MMDiT, tiny: 2x2 patches of 16 channels, 3 joint blocks of 4 heads x 8, RMS
    q/k norm, and block 0 with the second (image-only) attention of 3.5's MMDiT-X."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,  # 64 px images: 8x8 latents (the pipeline's default size)
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _TEXT_HIDDEN,  # both CLIP encoders' projections, concatenated
        pos_embed_max_size=32,  # up to 512 px
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def flux_transformer(guidance_embeds: bool):
    """FLUX.1's MMDiT, tiny: 1 joint + 2 single blocks of 2 heads x 16, 3-axis RoPE over 16 dims."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2 into tokens by the pipeline
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        pooled_projection_dim=_TEXT_HIDDEN,  # CLIP's pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def _build_sd3_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from lorachain.models.t5_tokenizer import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer_3 = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_flow_vae(SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(text_config()),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(text_config()),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=t5_encoder(len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def _build_flux_pipeline(architecture: str, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    from lorachain.models.t5_tokenizer import build_t5_tokenizer

    torch.manual_seed(seed)
    dev = architecture == "flux"  # -dev is guidance-distilled; -schnell is timestep-distilled, without
    tokenizer_2 = build_t5_tokenizer()
    return FluxPipeline(
        transformer=flux_transformer(guidance_embeds=dev),
        scheduler=FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if dev else FLUX_SCHNELL_SCHEDULER)),
        vae=_flow_vae(FLUX_VAE),
        text_encoder=CLIPTextModel(text_config()),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=t5_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
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
