"""The input widths of a U-Net's targeted attention layers, read from its ``config.json`` alone
(import-light: the config check runs while the Snakefile is parsed, before any model is loaded).

In diffusers' ``UNet2DConditionModel`` every attention of a block with cross-attention works at
that block's channel count: ``to_q``, ``to_out.0`` and the self-attention ``to_k`` / ``to_v`` take
inputs of that width, the cross-attention ``to_k`` / ``to_v`` the text width
(``cross_attention_dim``). Methods whose capacity depends on the narrowest targeted width
(Orthogonal Adaptation's coordinated columns: in_features // rank concepts) check it from here.
"""

from __future__ import annotations

import json
from pathlib import Path

UNET_CONFIG = Path("unet") / "config.json"


def pipeline_json(source: str, name: str | Path) -> dict | None:
    """A JSON file (``model_index.json``, ``unet/config.json``, ...) of a local pipeline directory,
    or of a hub id (``owner/name`` or ``owner/name@revision``) already in the local cache; None when
    it cannot be read without loading or downloading anything."""
    path = Path(source).expanduser() / name
    if path.is_file():
        return json.loads(path.read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.split("@")[0], str(name))
    except Exception:  # not a hub id, or no cache: nothing to read offline
        return None
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def unet_config(source: str) -> dict | None:
    """The U-Net config of a pipeline (:func:`pipeline_json`)."""
    return pipeline_json(source, UNET_CONFIG)


def narrowest_targeted_width(config: dict, target_modules: list[str]) -> int | None:
    """The smallest input width among the targeted attention projections of the U-Net `config`,
    or None when no targeted name is an attention projection this module knows."""
    channels = list(config["block_out_channels"])
    attended = [width for width, kind in zip(channels, config["down_block_types"]) if "CrossAttn" in kind]
    attended += [width for width, kind in zip(reversed(channels), config["up_block_types"]) if "CrossAttn" in kind]
    if "CrossAttn" in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        attended.append(channels[-1])
    targets = set(target_modules)
    widths = list(attended) if targets & {"to_q", "to_k", "to_v", "to_out.0"} else []
    if targets & {"to_k", "to_v"}:
        widths.append(int(config["cross_attention_dim"]))
    return min(widths) if widths else None


TRANSFORMER_CONFIG = Path("transformer") / "config.json"


def transformer_config(source: str) -> dict | None:
    """An SD3 / FLUX transformer's config (:func:`pipeline_json`)."""
    return pipeline_json(source, TRANSFORMER_CONFIG)


def transformer_targeted_width(config: dict) -> int:
    """The input width of every attention projection of an SD3 / FLUX transformer: its inner width
    (heads x head dim); SD3's context stream works at caption_projection_dim (the same in SD3.5)."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    caption = config.get("caption_projection_dim")
    return min(inner, int(caption)) if caption else inner
