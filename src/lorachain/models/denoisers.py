"""What differs between the denoisers lorachain personalizes, in one place.

A U-Net pipeline (SD 1.x, SDXL: ``pipe.unet``, epsilon- or v-prediction) and a diffusion
transformer pipeline (SD3/3.5: ``SD3Transformer2DModel``; FLUX.1: ``FluxTransformer2DModel``;
``pipe.transformer``, flow matching) differ in how a prompt conditions the denoiser, how latents
are scaled (SD3/FLUX shift them first) and laid out (FLUX packs 2x2 patches into tokens), and what
the forward call takes. Every method, fold and merge acts on linear layers and never sees this:
the trainer, the samplers and the layer-input recorder ask :func:`family_of` and call its methods.

The forward calls follow diffusers' own DreamBooth LoRA scripts (train_dreambooth_lora_sd3.py,
train_dreambooth_lora_flux.py): SD3 takes the scheduler's timestep (0..1000), FLUX the timestep
/ 1000, its text and image position ids, and (FLUX.1-dev) the guidance value.
"""

from __future__ import annotations

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Both streams of the joint blocks (the image stream's to_*, the context stream's add_*_proj and
# to_add_out), SD3.5's second (self-)attention and FLUX's single blocks' attn.to_q/k/v.
TRANSFORMER_TARGETS = (*UNET_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class DenoiserError(ValueError):
    """A pipeline lorachain cannot personalize, or a config that does not fit its denoiser."""


def denoiser_name(pipe) -> str:
    """The pipeline component that denoises: ``"unet"`` or ``"transformer"``."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise DenoiserError(f"{type(pipe).__name__} has neither a unet nor a transformer component")


def denoiser(pipe):
    return getattr(pipe, denoiser_name(pipe))


def is_sdxl(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"


def unet_kwargs(condition: dict, batch: int, time_ids, dtype) -> dict:
    """A U-Net's keyword arguments for a batch: the prompt's states (SDXL: plus its pooled
    embedding and the batch's time ids)."""
    kwargs = {"encoder_hidden_states": condition["encoder_hidden_states"].expand(batch, -1, -1).to(dtype)}
    if "text_embeds" in condition:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": condition["text_embeds"].expand(batch, -1).to(dtype),
            "time_ids": time_ids.to(dtype),
        }
    return kwargs


class UNetFamily:
    """SD 1.x and SDXL: a cross-attention U-Net on VAE latents scaled by the VAE's factor."""

    name = "unet"
    flow_matching = False
    default_targets = UNET_TARGETS
    has_guidance_embedding = False

    def __init__(self, pipe):
        self.sdxl = is_sdxl(pipe)
        self.scaling_factor = pipe.vae.config.scaling_factor
        self.shift_factor = None

    def encode(self, pipe, prompt: str, device) -> dict:
        """The denoiser's conditioning of one prompt (autograd as the caller has it)."""
        if self.sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": embeds, "text_embeds": pooled}
        embeds, _ = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds}

    def latent_channels(self, pipe) -> int:
        return pipe.unet.config.in_channels

    def scaled_latents(self, sample):
        return sample * self.scaling_factor

    def pipeline_latents(self, latents):
        """What the pipeline's ``latents=`` takes for initial noises of shape (batch, c, h, w)."""
        return latents

    def forward(self, model, noisy, timesteps, condition: dict, time_ids, dtype, guidance=None):
        return model(noisy.to(dtype), timesteps, **unet_kwargs(condition, len(noisy), time_ids, dtype)).sample


class SD3Family(UNetFamily):
    """SD3 / 3.5: an MM-DiT on 16-channel latents, shifted then scaled; CLIP-L, CLIP-G and T5
    condition it (joint attention on their states, the two CLIPs' pooled projections)."""

    name = "sd3"
    flow_matching = True
    default_targets = TRANSFORMER_TARGETS

    def __init__(self, pipe):
        self.sdxl = False
        self.scaling_factor = pipe.vae.config.scaling_factor
        self.shift_factor = pipe.vae.config.shift_factor or 0.0

    def encode(self, pipe, prompt: str, device) -> dict:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def latent_channels(self, pipe) -> int:
        return pipe.transformer.config.in_channels

    def scaled_latents(self, sample):
        return (sample - self.shift_factor) * self.scaling_factor

    def _conditioning(self, condition: dict, batch: int, dtype) -> dict:
        return {
            "encoder_hidden_states": condition["encoder_hidden_states"].expand(batch, -1, -1).to(dtype),
            "pooled_projections": condition["pooled_projections"].expand(batch, -1).to(dtype),
        }

    def forward(self, model, noisy, timesteps, condition: dict, time_ids, dtype, guidance=None):
        kwargs = self._conditioning(condition, len(noisy), dtype)
        return model(hidden_states=noisy.to(dtype), timestep=timesteps, return_dict=False, **kwargs)[0]


class FluxFamily(SD3Family):
    """FLUX.1: a DiT on 16-channel latents packed into 2x2-patch tokens, conditioned by T5's states
    and CLIP's pooled output, with rotary position ids of text and image tokens, and (FLUX.1-dev,
    guidance-distilled) a guidance embedding."""

    name = "flux"

    def __init__(self, pipe):
        super().__init__(pipe)
        self.has_guidance_embedding = bool(pipe.transformer.config.guidance_embeds)

    def encode(self, pipe, prompt: str, device) -> dict:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, device=device, num_images_per_prompt=1)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def latent_channels(self, pipe) -> int:
        return pipe.transformer.config.in_channels // 4  # packed: 2x2 patches of the VAE's channels

    def pipeline_latents(self, latents):
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)

    def forward(self, model, noisy, timesteps, condition: dict, time_ids, dtype, guidance=None):
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width).to(dtype)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, dtype)
        kwargs = self._conditioning(condition, batch, dtype)
        import torch

        if self.has_guidance_embedding:
            if guidance is None:
                raise DenoiserError("this FLUX model has a guidance embedding: a guidance value must be given")
            kwargs["guidance"] = torch.full((batch,), float(guidance), device=noisy.device, dtype=torch.float32)
        prediction = model(
            hidden_states=packed,
            timestep=timesteps / 1000,
            txt_ids=condition["txt_ids"].to(dtype),
            img_ids=image_ids,
            return_dict=False,
            **kwargs,
        )[0]
        return (
            prediction.view(batch, height // 2, width // 2, channels, 2, 2)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(noisy.shape)
        )


def default_targets_of(model) -> tuple[str, ...]:
    """The default targets of a denoiser module (a U-Net's, or SD3's / FLUX's transformer's)."""
    return TRANSFORMER_TARGETS if type(model).__name__ in _FAMILIES else UNET_TARGETS


_FAMILIES = {"SD3Transformer2DModel": SD3Family, "FluxTransformer2DModel": FluxFamily}


def family_of(pipe):
    """The denoiser family of a loaded pipeline."""
    if denoiser_name(pipe) == "unet":
        return UNetFamily(pipe)
    transformer = type(pipe.transformer).__name__
    if transformer not in _FAMILIES:
        raise DenoiserError(
            f"{type(pipe).__name__}'s {transformer} is not a denoiser lorachain knows "
            f"(U-Net pipelines, {', '.join(_FAMILIES)})"
        )
    return _FAMILIES[transformer](pipe)


# The pipelines whose denoiser is pipe.transformer (flow matching), and its class.
TRANSFORMER_PIPELINES = {"StableDiffusion3Pipeline": "SD3Transformer2DModel", "FluxPipeline": "FluxTransformer2DModel"}
# What each denoiser component can be exported as (diffusers writes kohya keys for U-Nets only).
EXPORT_FORMATS = {"unet": ("diffusers", "kohya", "unet"), "transformer": ("diffusers", "transformer")}


def denoiser_component(pipeline_class_name: str) -> str:
    """The component a pipeline class's LoRA keys and fused weights name: ``transformer`` or ``unet``."""
    return "transformer" if pipeline_class_name in TRANSFORMER_PIPELINES else "unet"


def refused_export_formats(formats, component: str) -> list[str]:
    """The export formats (of the known ones) a denoiser component cannot be written as."""
    known = {name for names in EXPORT_FORMATS.values() for name in names}
    return [name for name in formats if name in known and name not in EXPORT_FORMATS[component]]


def embeddings_problem(key: str, family: str) -> str:
    return (
        f"config key {key}.embeddings: embedding tuning adds concept tokens to CLIP text encoders of U-Net "
        f"pipelines; it is not supported on a {family.upper()} transformer (whose prompts also go through T5): "
        "remove the embeddings block"
    )


def sampling_precision_problem(family: str, precision: str) -> str | None:
    if family == "flux" and precision == "fp16":
        return "config key sampling.precision: fp16 overflows in FLUX's activations; use bf16"
    return None


def check_family_config(family, config, method, method_key: str) -> None:
    """Refuse a training block or method that does not fit the denoiser, naming the key and the fix."""
    problems = family_config_problems(
        family.name, family.has_guidance_embedding, config.mixed_precision, config.guidance
    )
    if family.name != "unet" and getattr(method, "embeddings", None) is not None:
        problems.append(embeddings_problem(method_key, family.name))
    if problems:
        raise DenoiserError("; ".join(problems))


def family_config_problems(family: str, guidance_embedding: bool, mixed_precision: str, guidance) -> list[str]:
    """What the training block gets wrong for a denoiser family (also checked in the dry-run, from
    the model's config files alone)."""
    problems = []
    if family == "flux" and mixed_precision == "fp16":
        problems.append(
            "config key training.mixed_precision: fp16 overflows in FLUX's activations; use bf16 (or 'no' on a CPU)"
        )
    if guidance_embedding and guidance is None:
        problems.append(
            "config key training.guidance: this FLUX model is guidance-distilled (FLUX.1-dev: its transformer has "
            "a guidance embedding) and is trained at a guidance value; set training.guidance "
            "(3.5 in diffusers' train_dreambooth_lora_flux.py; 1.0 trains it unguided)"
        )
    if not guidance_embedding and guidance is not None:
        problems.append(
            f"config key training.guidance: {guidance!r} is set, but this model has no guidance embedding "
            "(FLUX.1-schnell, SD3 and U-Nets have none); remove training.guidance"
        )
    return problems


# -------------------------------------------------------------------- the family from config files

TINY_FAMILIES = {"sd1": "unet", "sdxl": "unet", "sd3": "sd3", "flux": "flux", "flux_schnell": "flux"}


def family_from_files(source: str) -> tuple[str, bool] | None:
    """(family, has a guidance embedding) of a pipeline from its model_index.json and transformer
    config alone (no model is loaded: the dry-run calls this); None when they cannot be read."""
    from lorachain.models.widths import pipeline_json

    index = pipeline_json(source, "model_index.json")
    if index is None:
        return None
    if "unet" in index:
        return "unet", False
    entry = index.get("transformer") or [None, None]
    if entry[1] not in _FAMILIES:
        return None
    config = pipeline_json(source, "transformer/config.json") or {}
    return _FAMILIES[entry[1]].name, bool(config.get("guidance_embeds", False))
