"""The embedding models that score generated images: DINO, CLIP and CSD.

Each is loaded once per job and run batched. ``embed_images`` returns L2-normalised float32 rows on
the CPU, so every metric is a plain dot product of rows.

- dino: ``facebook/dino-vits16`` (``transformers.ViTModel``), the CLS token of the last hidden state,
  with DINO's evaluation preprocessing (short side 256 bicubic, centre crop 224, ImageNet stats).
- clip: ``openai/clip-vit-base-patch32`` (``transformers.CLIPModel`` + its processor), projected image
  and text features.
- csd: the style descriptor of Somepalli et al. 2024 (github.com/learn2phoenix/CSD). Its checkpoint
  is a training ``save_dict``: ``{"model_state_dict": {"module.backbone.<OpenAI CLIP visual keys>",
  "module.last_layer_style", "module.last_layer_content"}, "args": argparse.Namespace, ...}``; the
  backbone is OpenAI's ViT-L/14 visual tower with its ``proj`` removed, the style head a raw
  ``[1024, 768]`` matrix. We rebuild the backbone with open_clip's ``VisionTransformer`` (same key
  names), its size read from the tensor shapes, so the real checkpoint and a tiny one share a loader.

``save_tiny_encoder`` writes seeded random-weight versions of the same classes for tests and the
offline demo.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from lorachain.files import loading_error_prefix
from lorachain.metrics.catalog import METRIC_ENCODER  # noqa: F401  (re-exported: metric -> encoder)
from lorachain.torch_env import torch

ENCODERS = ("dino", "clip", "csd")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLIP_TEXT_LENGTH = 77


class EncoderError(RuntimeError):
    """An encoder that cannot be loaded or used; the message names the source and the config key."""


class Encoder:
    """An image (and, for CLIP, text) embedding model in eval mode on one device."""

    name: str = ""

    def __init__(self, model, source: str, device, dim: int):
        self.model = model.eval().to(device=device, dtype=torch.float32)
        self.source = str(source)
        self.device = torch.device(device)
        self.dim = dim  # embedding width, also the width of an empty result

    def _pixels(self, images: list) -> torch.Tensor:
        """A batch of RGB PIL images -> a [b, 3, H, W] float tensor."""
        return torch.stack([self.transform(image) for image in images])

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_images(self, images: list, batch_size: int = 32) -> torch.Tensor:
        """[n, dim] float32 CPU tensor of L2-normalised image embeddings."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = [torch.empty(0, self.dim)]
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = [image.convert("RGB") for image in images[start : start + batch_size]]
                pixels = self._pixels(batch).to(self.device, torch.float32)
                rows.append(_normalised(self._image_features(pixels)))
        return torch.cat(rows)

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        raise EncoderError(
            f"the {self.name} encoder ({self.source}) embeds images only; text embeddings come from clip"
        )


def _keys(keys, limit: int = 20) -> str:
    """A readable list of state-dict keys, capped: a wrong file can mismatch hundreds."""
    keys = sorted(keys)
    return repr(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _normalised(features) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def _features(output) -> torch.Tensor:
    """transformers 5 returns a BaseModelOutputWithPooling from get_*_features (the projected
    features in ``pooler_output``); older releases returned the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DinoEncoder(Encoder):
    name = "dino"

    def __init__(self, model, source, device):
        super().__init__(model, source, device, dim=model.config.hidden_size)
        self.transform = dino_transform()

    def _image_features(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token


class ClipEncoder(Encoder):
    name = "clip"

    def __init__(self, model, processor, source, device):
        super().__init__(model, source, device, dim=model.config.projection_dim)
        self.processor = processor

    def _pixels(self, images):
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def _image_features(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """[n, projection_dim] float32 CPU tensor of L2-normalised text embeddings."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rows = [torch.empty(0, self.dim)]
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self.processor.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding="max_length",
                    max_length=CLIP_TEXT_LENGTH,
                    truncation=True,
                    return_tensors="pt",
                ).to(self.device)
                output = self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
                rows.append(_normalised(_features(output)))
        return torch.cat(rows)


class CsdEncoder(Encoder):
    name = "csd"

    def __init__(self, model, source, device, image_size: int):
        super().__init__(model, source, device, dim=model.last_layer_style.shape[1])
        self.transform = csd_transform(image_size)

    def _image_features(self, pixels):
        return self.model(pixels)


def dino_transform():
    """DINO's evaluation protocol (also the DreamBooth paper's DINO metric)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def csd_transform(image_size: int = 224):
    """CSD's evaluation transform (its ``transforms_branch0``): resize bicubic, centre crop, CLIP stats."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )


# ----------------------------------------------------------------------------- loading


def load_encoder(name: str, block: dict, device="cpu") -> Encoder:
    """The encoder `name` from its config block: {"pretrained": hub id or local dir} for dino and
    clip, {"checkpoint": file} for csd."""
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; expected one of {ENCODERS}")
    field = "checkpoint" if name == "csd" else "pretrained"
    key = f"metrics.{name}.{field}"
    source = (block or {}).get(field)
    if not source:
        raise EncoderError(f"config key {key} is not set")
    source = str(source)
    world = block.get("world")  # set when the workflow built this encoder on a world: it must be that one
    if world and name != "csd":
        check_world(marker_world(source), world, source, key)
    if name == "dino":
        from transformers import ViTModel

        # DINO has no pooler; without it the hub checkpoint loads with nothing missing.
        return DinoEncoder(_from_pretrained(ViTModel, source, key, add_pooling_layer=False), source, device)
    if name == "clip":
        from transformers import CLIPModel, CLIPProcessor

        model = _from_pretrained(CLIPModel, source, key)
        return ClipEncoder(model, _from_pretrained(CLIPProcessor, source, key), source, device)
    model, image_size = _load_csd(source, key, world)
    return CsdEncoder(model, source, device, image_size)


def marker_world(directory: str | Path) -> str | None:
    """The world id in a directory's built marker (None: not built on a world)."""
    import json

    from lorachain.files import BUILT_MARKER

    marker = Path(directory).expanduser() / BUILT_MARKER
    return json.loads(marker.read_text()).get("world") if marker.is_file() else None


def check_world(found: str | None, expected: str, source: str, key: str) -> None:
    """Refuse an encoder trained on another world: its similarities mean nothing on this one."""
    if found != expected:
        what = f"was trained on world {found}" if found else "was not trained on a world"
        raise EncoderError(
            f"config key {key}: {source} {what}, but config key world describes world {expected}; "
            f"delete {source} and rerun: the workflow trains it on this world"
        )


def _from_pretrained(cls, source: str, key: str, **kwargs):
    from transformers import PreTrainedModel

    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or source.startswith((".", "/", "~")) or len(source.split("/")) != 2):
        raise EncoderError(f"config key {key}: {source!r} is neither an existing directory nor a hub id (owner/name)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    is_model = issubclass(cls, PreTrainedModel)
    if is_model:  # transformers 5 defaults to the checkpoint's dtype; metrics run in fp32
        kwargs.update(dtype=torch.float32, output_loading_info=True)
    try:
        loaded = cls.from_pretrained(str(path) if local else source, local_files_only=local or offline, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        where = "directory" if local else "hub id (offline: only the local cache is searched)" if offline else "hub id"
        prefix, fix = loading_error_prefix(source, key)
        raise EncoderError(
            f"{prefix}: cannot load {cls.__name__} from {source!r} as a {where}: {error}{fix}"
        ) from error
    if not is_model:
        return loaded
    model, info = loaded
    if info.get("missing_keys"):  # random weights would give meaningless scores: refuse them
        raise EncoderError(
            f"config key {key}: {source!r} lacks weights of {cls.__name__}: missing keys {_keys(info['missing_keys'])}"
        )
    return model


class _CsdModel(torch.nn.Module):
    """CSD's module layout: backbone + raw [width, dim] style/content matrices (not nn.Linear)."""

    def __init__(self, backbone, width: int, dim: int):
        super().__init__()
        self.backbone = backbone
        self.last_layer_style = torch.nn.Parameter(torch.randn(width, dim) * width**-0.5)
        self.last_layer_content = torch.nn.Parameter(torch.randn(width, dim) * width**-0.5)

    def forward(self, pixels):
        return self.backbone(pixels) @ self.last_layer_style  # normalised by the caller


def _csd_backbone(image_size: int, patch_size: int, width: int, layers: int, mlp_width: int):
    from open_clip.transformer import QuickGELU, VisionTransformer

    backbone = VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=max(1, width // 64),  # OpenAI CLIP's head width
        mlp_ratio=mlp_width / width,
        act_layer=QuickGELU,  # OpenAI's CLIP (CSD's starting point) uses QuickGELU, open_clip defaults to GELU
    )
    backbone.proj = None  # CSD drops CLIP's projection: the pooled ln_post feature feeds the heads
    return backbone


def _read_csd_state(path: Path, key: str) -> tuple[dict, object]:
    """(the state dict without DataParallel prefixes, the run's argparse Namespace or None)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # The released file is a training save_dict that also pickles the argparse Namespace of
            # its run; allowing that one plain class keeps the weights-only (no code execution) load.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, foreign pickle, ...: say which file and key
        prefix, fix = loading_error_prefix(path, key)
        raise EncoderError(f"{prefix}: cannot read CSD checkpoint {path}: {error}{fix}") from error
    args = None
    if isinstance(state, dict) and "model_state_dict" in state:
        args = state.get("args")
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"config key {key}: {path} holds no state dict (expected a dict with 'model_state_dict')")
    return {k.removeprefix("module."): v for k, v in state.items()}, args  # saved from DataParallel


def _load_csd(source: str, key: str, world: str | None = None):
    path = Path(source).expanduser()
    if not path.is_file():
        raise EncoderError(f"config key {key}: CSD checkpoint {source!r} does not exist (or is not a file)")
    state, args = _read_csd_state(path, key)
    if world:  # the world id travels in the checkpoint's run arguments (the release's layout)
        check_world(getattr(args, "world", None), world, source, key)

    # Architecture from the shapes, so the ViT-L/14 release and a tiny checkpoint load alike.
    needed = [
        "backbone.conv1.weight",
        "backbone.positional_embedding",
        "backbone.transformer.resblocks.0.mlp.c_fc.weight",
        "last_layer_style",
    ]
    if absent := [k for k in needed if k not in state]:
        raise EncoderError(
            f"config key {key}: {path} is not a CSD checkpoint; missing keys {absent} (it has {_keys(state, 8)})"
        )
    width, _, patch_size, _ = state["backbone.conv1.weight"].shape
    grid = math.isqrt(state["backbone.positional_embedding"].shape[0] - 1)
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"backbone\.transformer\.resblocks\.(\d+)\.", k)))
    mlp_width = state["backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    style = state["last_layer_style"]
    if style.ndim != 2 or style.shape[0] != width:
        raise EncoderError(
            f"config key {key}: {path}: last_layer_style has shape {tuple(style.shape)}, expected [{width}, dim]"
        )

    import open_clip.transformer  # noqa: F401  (imported outside the meta-device context below)

    with torch.device("meta"):  # no random init of ~300M parameters that are overwritten at once
        model = _CsdModel(_csd_backbone(grid * patch_size, patch_size, width, layers, mlp_width), width, style.shape[1])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise EncoderError(f"config key {key}: {path} does not fit the CSD layout: {error}") from error
    if missing or unexpected:
        raise EncoderError(
            f"config key {key}: {path} does not match the CSD layout; "
            f"missing keys {_keys(missing)}, unexpected keys {_keys(unexpected)}"
        )
    return model, grid * patch_size


# ----------------------------------------------------------------------------- tiny models


def save_tiny_encoder(name: str, output_dir: str | Path, seed: int = 0, config_key: str | None = None) -> Path:
    """Write a seeded random-weight encoder of the real classes; returns what load_encoder takes
    (the directory for dino/clip, the checkpoint file for csd). `config_key`: the workflow built it
    for this key (metrics.<name>.tiny), recorded so that a load error can say how to rebuild it."""
    if name not in ENCODERS:
        raise EncoderError(f"unknown encoder {name!r}; expected one of {ENCODERS}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config_key is not None:
        from lorachain.files import write_built_marker

        write_built_marker(output_dir, config_key, encoder=name, seed=seed)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        if name == "dino":
            small_dino(width=32, layers=2, heads=2, patch_size=16).save_pretrained(output_dir)
            return output_dir
        if name == "clip":
            _tiny_clip(output_dir)
            return output_dir
        width, dim = 64, 32
        model = _CsdModel(_csd_backbone(224, 16, width, layers=2, mlp_width=4 * width), width, dim)
    return save_csd_checkpoint(model, output_dir / "checkpoint.pth", argparse.Namespace(arch="tiny", seed=seed))


def save_csd_checkpoint(model, checkpoint: str | Path, args: argparse.Namespace) -> Path:
    """Write a CSD model in the release's layout: DataParallel keys under model_state_dict, plus
    the run's argparse Namespace."""
    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": state, "iter": 0, "args": args}, checkpoint)
    return checkpoint


def small_dino(width: int, layers: int, heads: int, patch_size: int):
    """A ViTModel of DINO's class and layout (no pooler, 224 px input), `width` wide; seeded by the caller."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * width,
        patch_size=patch_size,
        image_size=224,
        layer_norm_eps=1e-6,
    )
    return ViTModel(config, add_pooling_layer=False)


def _tiny_clip(output_dir: Path) -> None:
    save_clip(small_clip(width=32), output_dir)


def small_clip(width: int):
    """A CLIPModel of the real class and layout (ViT-B/32-like patching at 224 px), `width` wide,
    with the real CLIP vocabulary; seeded by the caller."""
    from transformers import CLIPConfig, CLIPModel

    from lorachain.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

    common = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **common,
        ),
        vision_config=dict(image_size=224, patch_size=32, **common),
        projection_dim=width,
    )
    return CLIPModel(config)


def save_clip(model, output_dir: str | Path) -> None:
    """The model plus a CLIPProcessor with openai/clip-vit-base-patch32's settings and the real BPE."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from lorachain.models.tokenizer import build_clip_tokenizer

    model.save_pretrained(output_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        resample=3,
        crop_size={"height": 224, "width": 224},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(output_dir)


def build_tiny_encoder_job(*, encoder: str, seed: int, output_dir) -> None:
    """The build_tiny_encoder job: the tiny `encoder` (dino, clip or csd; config key metrics.<encoder>.tiny)."""
    save_tiny_encoder(encoder, output_dir, seed=seed, config_key=f"metrics.{encoder}.tiny")
