"""Pretrain a world's base model: a tiny SD-1.x pipeline (diffusers' classes, the real CLIP BPE).

Three phases, each a plain supervised loop on the world's corpus:
1. the VAE learns to reconstruct the world's images (MSE plus a small KL term, as SD's autoencoder);
2. the corpus is encoded once to latent means, scaled to unit variance (SD's scaling_factor);
3. the U-Net and the text encoder learn epsilon prediction on the DDPM schedule SD was trained on,
   captions dropped 10 % of the time so that classifier-free guidance works.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lorachain.models.tiny import SD_SCHEDULER
from lorachain.torch_env import torch
from lorachain.world.corpus import Corpus, build_corpus
from lorachain.world.spec import WorldSpec

# Measured with the large, centred objects (docs/world.md#measurements): 5.5 minutes on 2 cores,
# samples of class prompts show their shapes, and LoRA training moves the concepts' scores.
PRETRAIN_DEFAULTS = {
    "corpus": 8000,
    "vae_steps": 400,
    "vae_batch_size": 32,
    "unet_steps": 600,
    "unet_batch_size": 64,
    "learning_rate": 2.0e-3,
    "caption_dropout": 0.1,
    "min_snr_gamma": 5.0,
}


def log_progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_vae(resolution: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        # Two 2x downsamplings: at the world's 32 px, 8x8 latents (SD's 8x VAE at 64 px blurs the
        # world's details away after the training a CPU allows).
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=resolution,
    )


def build_denoiser(latent_size: int):
    """The tiny SD-1.x text encoder and U-Net (lorachain.models.tiny's layout), for `latent_size` latents."""
    from transformers import CLIPTextModel

    from lorachain.models.tiny import text_config, unet

    text = CLIPTextModel(text_config())
    return text, unet(cross_attention_dim=text.config.hidden_size, sample_size=latent_size)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(corpus: Corpus, settings: dict, generator: torch.Generator):
    vae = build_vae(corpus.images.shape[1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    count = len(corpus.images)
    for step in range(settings["vae_steps"]):
        index = torch.randint(count, (settings["vae_batch_size"],), generator=generator)
        pixels = _pixels(corpus.images[index.numpy()])
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == settings["vae_steps"] - 1:
            log_progress(f"vae step {step}: loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_corpus(vae, corpus: Corpus, batch_size: int = 256) -> torch.Tensor:
    """Latent means of the whole corpus, and the VAE's scaling_factor set to unit variance."""
    means = [
        vae.encode(_pixels(corpus.images[start : start + batch_size])).latent_dist.mean
        for start in range(0, len(corpus.images), batch_size)
    ]
    latents = torch.cat(means)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return latents * scaling


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_denoiser(latents: torch.Tensor, token_ids: torch.Tensor, empty_ids: torch.Tensor, settings, generator):
    from diffusers import DDPMScheduler

    text, unet = build_denoiser(latents.shape[-1])
    noise_schedule = DDPMScheduler(**SD_SCHEDULER)
    parameters = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings["learning_rate"], weight_decay=1e-4)
    steps, batch = settings["unet_steps"], settings["unet_batch_size"]
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps))
    )
    for step in range(steps):
        index = torch.randint(len(latents), (batch,), generator=generator)
        ids = token_ids[index].clone()
        ids[torch.rand(batch, generator=generator) < settings["caption_dropout"]] = empty_ids
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, text(ids)[0]).sample
        # Min-SNR weighting (Hang et al. 2023, gamma 5): the same optimum, several times fewer steps.
        snr = noise_schedule.alphas_cumprod[timesteps] / (1 - noise_schedule.alphas_cumprod[timesteps])
        weights = torch.clamp(snr, max=settings["min_snr_gamma"]) / snr
        loss = (weights * ((prediction - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log_progress(f"denoiser step {step}: loss {loss.item():.4f}")
    return text.eval(), unet.eval()


def pretrain_pipeline(spec: WorldSpec, settings: dict, output_dir: str | Path):
    """Pretrain the world's base pipeline and write it with save_pretrained; returns the pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from lorachain.models.tokenizer import build_clip_tokenizer

    settings = {**PRETRAIN_DEFAULTS, **(settings or {})}
    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    log_progress(f"rendering {settings['corpus']} captioned images")
    corpus = build_corpus(spec, settings["corpus"])
    vae = train_vae(corpus, settings, generator)
    latents = encode_corpus(vae, corpus)
    tokenizer = build_clip_tokenizer()
    token_ids = tokenize(tokenizer, corpus.captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    text, unet = train_denoiser(latents, token_ids, empty_ids, settings, generator)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return pipe
