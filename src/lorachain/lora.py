"""The records every side of the library shares, and the one LoRA reader.

* :class:`LayerAdapter`: the LoRA factors of one targeted linear layer, delta = scale * B @ A;
* :class:`Concept`: one concept's LoRA as a merge sees it (factors, slot, recorded input Grams);
* :class:`LoraFile`: one LoRA file as read by :func:`read_lora` (or :func:`parse_lora` from bytes);
* :func:`check_compatible`: whether LoRAs adapt the same layers with deltas of the same shapes;
* :func:`linear_combination`: sum_i c_i scale_i B_i A_i, exactly.

Reading LoRA files. :func:`read_lora` reads the standard diffusers / peft LoRA safetensors layout
that this project's trainer writes (``StableDiffusionPipeline.save_lora_weights``) and that most
published LoRAs use:

* keys ``unet.<layer>.lora_A.weight`` (r, in_features) and ``unet.<layer>.lora_B.weight``
  (out_features, r); also accepted without the ``unet.`` prefix and with peft's
  ``base_model.model.`` prefix (``get_peft_model_state_dict`` output);
* optional per-layer ``<layer>.alpha`` scalar tensors (kohya-style files converted to diffusers
  layer names);
* the safetensors metadata key ``lora_adapter_metadata``: a JSON string of the peft ``LoraConfig``,
  whose keys carry the component prefix (``"unet.lora_alpha"``, ``"unet.r"``,
  ``"unet.rank_pattern"``, ...) in diffusers files and none in plain peft files.

Scale of a layer (delta = scale * B @ A): alpha / r, or alpha / sqrt(r) when the config says
``use_rslora``. alpha comes from, in this order: the config's ``alpha_pattern`` entry for the layer,
the config's ``lora_alpha``, the layer's ``.alpha`` tensor, else alpha = r (scale 1). r is read off
A's shape; layers of different ranks are an error unless the config has a ``rank_pattern`` or every
layer has its own ``.alpha`` (kohya files).

Third-party layouts are normalised to that one first, by diffusers' and peft's own converters:

* kohya / A1111 files (``lora_unet_<module_path>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``, text-encoder keys ``lora_te*_``): ``StableDiffusionLoraLoaderMixin.lora_state_dict``
  (diffusers' ``_convert_non_diffusers_lora_to_diffusers``) then ``convert_unet_state_dict_to_peft``;
  each kohya ``.alpha`` becomes the ``<layer>.alpha`` of the layer its ``lora_down`` converted to
  (by the same converter), so the layer's scale is kohya's alpha / r. kohya's DoRA ``dora_scale``
  keys are refused (diffusers would drop them silently). Block names are not checked against an
  architecture here (a file alone does not name one): :func:`check_compatible` refuses files that
  adapt different layers, and :func:`check_fits_unet` a file whose layers a given U-Net lacks.
* peft files (``PeftModel.save_pretrained``: ``base_model.model.<layer>.lora_A.weight`` in
  ``adapter_model.safetensors``): the prefix is stripped; with no config in the file's metadata,
  the ``adapter_config.json`` beside it gives r, lora_alpha and the patterns.

Keys of other components (``text_encoder.*``, ``text_encoder_2.*``) are ignored and listed in
:attr:`LoraFile.notes`: every merge method works on the U-Net. Anything else that is not a plain
LoRA factor (DoRA magnitudes, LoRA biases, conv factors) is refused rather than silently dropped,
because the merged delta would be wrong without it. ``strict=True`` (the state store's own files)
accepts nothing but ``unet.<layer>.lora_A.weight`` / ``.lora_B.weight`` pairs.

Every :class:`LoraFileError` names the file and, where there is one, the key. Torch is imported on
first use (:mod:`lorachain.lazy_torch`), so the registries that import this module stay torch-free.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorachain.lazy_torch import torch

METADATA_KEY = "lora_adapter_metadata"  # what diffusers' save_lora_weights writes
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_ALPHA_SUFFIX = ".alpha"
_UNET_PREFIX = "unet."
_DENOISER_PREFIXES = ("unet.", "transformer.")  # diffusers' U-Net / SD3 and FLUX transformer keys
_LAYER_PREFIXES = (*_DENOISER_PREFIXES, "base_model.model.")  # stripped (in this order, each at most once)
_PER_LAYER_ALPHA = "per-layer .alpha tensors"
_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")


@dataclass
class LayerAdapter:
    """LoRA factors of one targeted linear layer: delta = scale * B @ A."""

    A: torch.Tensor  # (rank, in_features)
    B: torch.Tensor  # (out_features, rank)
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


@dataclass
class Concept:
    """One concept's LoRA as the merge sees it."""

    name: str  # file path or concept id; used in error messages
    adapters: dict[str, LayerAdapter]
    slot: int | None = None  # concept slot (BlockLoRA block / orthogonal-adaptation basis block), if known
    # layer -> (X^T X summed over the recorded inputs of that layer, number of input rows); gradient fusion only
    grams: dict[str, tuple[torch.Tensor, int]] | None = None

    def delta(self, layer: str) -> torch.Tensor:
        return self.adapters[layer].delta()


def linear_combination(adapters: Sequence[LayerAdapter], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_i c_i * scale_i * B_i @ A_i, exactly (no cross terms), as one matmul of the factors
    concatenated along the rank: [c_1 s_1 B_1 | ... | c_k s_k B_k] @ [A_1; ...; A_k]."""
    B = torch.cat([float(c) * adapter.scale * adapter.B.float() for adapter, c in zip(adapters, coefficients)], dim=1)
    A = torch.cat([adapter.A.float() for adapter in adapters], dim=0)
    return B @ A


class LoraFileError(ValueError):
    """A LoRA file that cannot be used as it is; the message names the file and the key."""


@dataclass
class LoraFile:
    """One LoRA file as the merges see it: per-layer factors with their scale folded in."""

    path: Path
    adapters: dict[str, LayerAdapter]  # U-Net layer name (as in unet.named_modules()) -> factors
    rank: int  # the common rank (the config's default r when a rank_pattern makes ranks differ)
    alpha: float | None  # the common alpha; None when per-layer alphas differ (scales hold them)
    metadata: dict = field(default_factory=dict)  # the LoraConfig from the file's metadata, prefix removed
    notes: list[str] = field(default_factory=list)  # what was ignored, and where alpha came from

    @property
    def name(self) -> str:
        return str(self.path)

    def layers(self) -> list[str]:
        return sorted(self.adapters)

    def delta(self, layer: str) -> torch.Tensor:
        return self.adapters[layer].delta()

    def to_concept(self, name: str | None = None, slot: int | None = None) -> Concept:
        """This file as a merge :class:`Concept`."""
        return Concept(name=name or str(self.path), adapters=self.adapters, slot=slot)


def _strip_prefixes(key: str) -> str:
    for prefix in _LAYER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _adapter_config(path: Path, raw_metadata: dict | None) -> dict:
    """The U-Net's LoraConfig from the safetensors metadata, with the ``unet.`` prefix removed."""
    if not raw_metadata or METADATA_KEY not in raw_metadata:
        return {}
    try:
        config = json.loads(raw_metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise LoraFileError(f"{path}: metadata key {METADATA_KEY!r} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise LoraFileError(f"{path}: metadata key {METADATA_KEY!r} holds {type(config).__name__}, not a JSON object")
    prefixed = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(_DENOISER_PREFIXES)}
    if prefixed:
        return prefixed
    # A plain peft file carries the config unprefixed; a diffusers file without a unet config holds
    # only other components' keys ("text_encoder.r", ...), which say nothing about the U-Net.
    return {k: v for k, v in config.items() if "." not in k}


def _pattern_value(patterns: dict, layer: str):
    """peft's get_pattern_key: a pattern matches the layer name or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return None


def _safetensors_metadata(data: bytes) -> dict | None:
    """The ``__metadata__`` of a safetensors buffer (called after it parsed: the header is sound)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]).get("__metadata__")


def _load_tensors(path: Path, data: bytes) -> tuple[dict, dict | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data), _safetensors_metadata(data)
    except (SafetensorError, ValueError, struct.error) as error:
        raise LoraFileError(f"{path}: not a readable safetensors file ({error})") from None


def read_lora(path: str | Path, *, strict: bool = False) -> LoraFile:
    """Read one diffusers / peft LoRA safetensors file (see the module docstring for the layout)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise LoraFileError(f"{path}: not a readable safetensors file ({error})") from None
    return parse_lora(data, path, strict=strict)


def parse_lora(data: bytes, path: str | Path, *, strict: bool = False) -> LoraFile:
    """A LoRA file from its bytes (`path` names it in messages); ``strict``: only U-Net factor pairs."""
    path = Path(path)
    tensors, raw_metadata = _load_tensors(path, data)
    if strict:
        _check_strict_keys(path, tensors)
    elif _is_kohya(tensors):
        tensors = _kohya_to_peft(path, tensors)
    config = _adapter_config(path, raw_metadata)
    if not config and not strict and any(key.startswith("base_model.model.") for key in tensors):
        config = _sidecar_config(path)
    factors, notes = _group_factors(path, tensors)
    adapters, ranks, alphas, sources = _layer_adapters(path, factors, config)
    distinct_ranks = sorted(set(ranks.values()))
    # Ranks may differ where the config has a rank_pattern, or where every layer carries its own alpha (kohya).
    per_layer_alphas = sources == {_PER_LAYER_ALPHA}
    if len(distinct_ranks) > 1 and not (config.get("rank_pattern") or {}) and not per_layer_alphas:
        first = min(ranks)
        other = next(layer for layer in sorted(ranks) if ranks[layer] != ranks[first])
        raise LoraFileError(
            f"{path}: layer {other!r} has rank {ranks[other]} but layer {first!r} has rank {ranks[first]}, "
            "and the file's metadata has no rank_pattern that would explain it"
        )
    rank = distinct_ranks[0] if len(distinct_ranks) == 1 else int(config.get("r", distinct_ranks[0]))
    distinct_alphas = sorted(set(alphas.values()))
    notes.append(f"alpha from {', '.join(sorted(sources))}")
    return LoraFile(
        path=path,
        adapters=adapters,
        rank=rank,
        alpha=distinct_alphas[0] if len(distinct_alphas) == 1 else None,
        metadata=config,
        notes=notes,
    )


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PEFT_CONFIG_NAME = "adapter_config.json"  # what PeftModel.save_pretrained writes beside the weights


def _is_kohya(tensors: dict) -> bool:
    return any(key.startswith(_KOHYA_PREFIXES) for key in tensors)


def _kohya_to_peft(path: Path, tensors: dict) -> dict:
    """A kohya / A1111 state dict in this module's layout (``unet.<layer>.lora_A.weight``, ``.lora_B.weight``,
    ``<layer>.alpha``; text-encoder keys under ``text_encoder*.``), converted by diffusers."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    other = sorted(key for key in tensors if not key.startswith(_KOHYA_PREFIXES))
    if other:
        raise LoraFileError(
            f"{path}: mixes kohya keys (lora_unet_*, lora_te*_) with other keys such as {other[0]!r}; "
            "no converter reads such a file"
        )
    if dora := sorted(key for key in tensors if key.endswith(".dora_scale")):
        raise LoraFileError(f"{path}: key {dora[0]!r} is a DoRA magnitude; DoRA LoRAs are not supported by the merges")
    try:
        state_dict, network_alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
    except (ValueError, KeyError) as error:  # an up without a down, an unknown key, ...
        message = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
        raise LoraFileError(f"{path}: not a kohya LoRA file diffusers can convert ({message})") from None
    converted = {key: value for key, value in state_dict.items() if not key.startswith(_UNET_PREFIX)}
    converted |= _peft_keys({key: value for key, value in state_dict.items() if key.startswith(_UNET_PREFIX)})
    for alpha_key, alpha in (network_alphas or {}).items():
        if alpha_key.startswith(_UNET_PREFIX):
            converted[_UNET_PREFIX + _kohya_alpha_layer(alpha_key) + _ALPHA_SUFFIX] = torch.tensor(float(alpha))
    return converted


def _peft_keys(unet_state_dict: dict) -> dict:
    """diffusers' (old-style) U-Net LoRA keys as peft keys: ``unet.<layer>.lora_A.weight``."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unprefixed = {key[len(_UNET_PREFIX) :]: value for key, value in unet_state_dict.items()}
    return {_UNET_PREFIX + key: value for key, value in convert_unet_state_dict_to_peft(unprefixed).items()}


def _kohya_alpha_layer(alpha_key: str) -> str:
    """The layer of a diffusers network-alpha key. diffusers names the alpha after its down key cut at
    ``.lora.`` (``unet.<path>.alpha`` for ``<path>.lora.down.weight``; the whole down key for the
    attention's ``to_q_lora.down.weight``), so rebuild that down key and convert it as the factor was."""
    down_key = alpha_key[: -len(_ALPHA_SUFFIX)]
    if not down_key.endswith(".down.weight"):
        down_key += ".lora.down.weight"
    (peft_key,) = _peft_keys({down_key: None})
    return peft_key[len(_UNET_PREFIX) : -len(_A_SUFFIX)]


def _sidecar_config(path: Path) -> dict:
    """The LoraConfig of a peft file from the ``adapter_config.json`` beside it ({} when there is none)."""
    sidecar = path.parent / PEFT_CONFIG_NAME
    if not sidecar.is_file():
        return {}
    try:
        config = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LoraFileError(f"{sidecar}: the peft config beside {path.name} is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise LoraFileError(f"{sidecar}: holds {type(config).__name__}, not a JSON object (peft's LoraConfig)")
    if config.get("use_dora"):
        raise LoraFileError(f"{sidecar}: use_dora is true; DoRA LoRAs are not supported by the merges")
    return config


def _check_strict_keys(path: Path, tensors: dict) -> None:
    """Every key is ``unet.<layer>.lora_A.weight`` or ``.lora_B.weight``, each with its partner."""
    for key in sorted(tensors):
        suffix = _A_SUFFIX if key.endswith(_A_SUFFIX) else _B_SUFFIX if key.endswith(_B_SUFFIX) else None
        if suffix is None or not key.startswith(_DENOISER_PREFIXES):
            raise LoraFileError(
                f"{path}: key {key!r} is not a LoRA factor ({_UNET_PREFIX}<layer>{_A_SUFFIX} / {_B_SUFFIX})"
            )
        other = key[: -len(suffix)] + (_B_SUFFIX if suffix == _A_SUFFIX else _A_SUFFIX)
        if other not in tensors:
            raise LoraFileError(f"{path}: key {key!r} has no matching {other!r}")


def _group_factors(path: Path, tensors: dict) -> tuple[dict, list[str]]:
    """layer -> {"A" | "B" | "alpha": (key, tensor)}, and the notes on what was ignored."""
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    ignored, notes = [], []
    for key in sorted(tensors):
        if key.startswith(_OTHER_COMPONENTS):
            ignored.append(key)
            continue
        layer_key = _strip_prefixes(key)
        for part, suffix in (("A", _A_SUFFIX), ("B", _B_SUFFIX), ("alpha", _ALPHA_SUFFIX)):
            if layer_key.endswith(suffix):
                factors.setdefault(layer_key[: -len(suffix)], {})[part] = (key, tensors[key])
                break
        else:
            raise LoraFileError(
                f"{path}: key {key!r} is not a LoRA factor (expected the diffusers / peft layout <layer>{_A_SUFFIX}, "
                f"<layer>{_B_SUFFIX} or <layer>{_ALPHA_SUFFIX}, or kohya's lora_unet_<layer>.lora_down.weight / "
                ".lora_up.weight / .alpha); DoRA magnitudes, LoRA biases and other extras are not supported "
                "by the merges"
            )
    if ignored:
        components = sorted({key.split(".", 1)[0] for key in ignored})
        notes.append(f"ignored {len(ignored)} key(s) of {', '.join(components)} (merges use the U-Net only)")
    if not any("A" in parts or "B" in parts for parts in factors.values()):
        example = f"; its keys start {sorted(tensors)[:3]}" if tensors else "; it has no tensors"
        raise LoraFileError(f"{path}: no U-Net LoRA keys (<layer>{_A_SUFFIX} / <layer>{_B_SUFFIX}){example}")
    return factors, notes


def _checked_pair(path: Path, parts: dict) -> tuple[str, torch.Tensor, str, torch.Tensor]:
    """(A key, A, B key, B) of one layer: both present, 2-D, of the same rank, finite."""
    if "A" not in parts or "B" not in parts:
        present, missing = ("A", "B") if "A" in parts else ("B", "A")
        if present not in parts:  # only an alpha tensor
            raise LoraFileError(f"{path}: key {parts['alpha'][0]!r} has no lora_A / lora_B factors for its layer")
        raise LoraFileError(
            f"{path}: key {parts[present][0]!r} has no matching lora_{missing} "
            f"(expected {parts[present][0].replace(f'.lora_{present}.', f'.lora_{missing}.')!r})"
        )
    (a_key, A), (b_key, B) = parts["A"], parts["B"]
    if A.dim() != 2 or B.dim() != 2:
        raise LoraFileError(
            f"{path}: key {a_key if A.dim() != 2 else b_key!r} "
            f"has shape {tuple(A.shape if A.dim() != 2 else B.shape)}; "
            "only linear-layer LoRA factors (2-D) can be merged"
        )
    if A.shape[0] != B.shape[1]:
        raise LoraFileError(
            f"{path}: key {b_key!r} has shape {tuple(B.shape)} but {a_key!r} has shape {tuple(A.shape)}: "
            "lora_B must be (out_features, r) and lora_A (r, in_features) with the same r"
        )
    for key, tensor in ((a_key, A), (b_key, B)):
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoraFileError(
                f"{path}: key {key!r} holds {bad} non-finite value(s) (NaN or inf); "
                "the LoRA is damaged or diverged in training"
            )
    return a_key, A, b_key, B


def _layer_alpha(path: Path, layer: str, parts: dict, config: dict, rank: int) -> tuple[float, str]:
    """alpha of one layer and where it came from (see the module docstring for the order)."""
    if (pattern_alpha := _pattern_value(config.get("alpha_pattern") or {}, layer)) is not None:
        return float(pattern_alpha), "alpha_pattern"
    if config.get("lora_alpha") is not None:
        return float(config["lora_alpha"]), f"metadata {METADATA_KEY}"
    if "alpha" in parts:
        alpha_key, alpha_tensor = parts["alpha"]
        if alpha_tensor.numel() != 1:
            raise LoraFileError(f"{path}: key {alpha_key!r} has {alpha_tensor.numel()} values; an alpha is one number")
        return float(alpha_tensor.reshape(())), _PER_LAYER_ALPHA
    return float(rank), "none stored: alpha = rank"


def _layer_adapters(path: Path, factors: dict, config: dict):
    """(adapters, ranks, alphas, alpha sources) of every layer."""
    use_rslora = bool(config.get("use_rslora", False))
    adapters: dict[str, LayerAdapter] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    sources: set[str] = set()
    for layer in sorted(factors):
        _, A, _, B = _checked_pair(path, factors[layer])
        rank = ranks[layer] = int(A.shape[0])
        alpha, source = _layer_alpha(path, layer, factors[layer], config, rank)
        alphas[layer] = alpha
        sources.add(source)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        adapters[layer] = LayerAdapter(A=A.float(), B=B.float(), scale=scale)
    return adapters, ranks, alphas, sources


def _label(item) -> str:
    return str(getattr(item, "name", None) or getattr(item, "path", None) or item)


def check_compatible(items: Sequence, need_equal_rank: bool = False) -> None:
    """Raise :class:`LoraFileError` unless all items (LoraFile or Concept) adapt the same layers with
    deltas of the same shapes (else they come from different base architectures); with
    ``need_equal_rank`` also the same rank in every layer. Messages name both items and the layer."""
    if len(items) < 2:
        return
    first = items[0]
    first_layers = set(first.adapters)
    for other in items[1:]:
        other_layers = set(other.adapters)
        if other_layers != first_layers:
            layer = sorted(first_layers ^ other_layers)[0]
            has, lacks = (first, other) if layer in first_layers else (other, first)
            raise LoraFileError(
                f"{_label(lacks)} and {_label(has)} adapt different layers: the first difference is {layer!r}, "
                f"present in {_label(has)} only ({len(first_layers)} vs {len(other_layers)} layers); "
                "LoRAs of different base architectures or target modules cannot be merged"
            )
    for layer in sorted(first_layers):
        reference = first.adapters[layer]
        shape = (reference.B.shape[0], reference.A.shape[1])
        for other in items[1:]:
            adapter = other.adapters[layer]
            other_shape = (adapter.B.shape[0], adapter.A.shape[1])
            if other_shape != shape:
                raise LoraFileError(
                    f"{_label(first)} and {_label(other)} differ at layer {layer!r}: delta shape (out, in) "
                    f"{tuple(shape)} vs {tuple(other_shape)}; LoRAs of different base architectures cannot be merged"
                )
            if need_equal_rank and adapter.A.shape[0] != reference.A.shape[0]:
                raise LoraFileError(
                    f"{_label(first)} and {_label(other)} differ at layer {layer!r}: rank {reference.A.shape[0]} "
                    f"vs {adapter.A.shape[0]}; this merge needs LoRAs of equal rank"
                )


def check_fits_unet(lora: LoraFile | Concept, unet) -> None:
    """Raise :class:`LoraFileError` unless every layer of `lora` is a linear layer of `unet` whose
    weight has the delta's shape (a LoRA of another architecture, e.g. an SDXL kohya file against an
    SD-1 U-Net, names blocks or widths this U-Net does not have). The message names the file and layer."""
    modules = dict(unet.named_modules())
    for layer, adapter in sorted(lora.adapters.items()):
        weight = getattr(modules.get(layer), "weight", None)
        if weight is None or weight.dim() != 2:
            raise LoraFileError(
                f"{_label(lora)}: layer {layer!r} is not a linear layer of this {type(unet).__name__} "
                f"({len(lora.adapters)} layers in the file); a LoRA for another base architecture cannot be applied"
            )
        if tuple(weight.shape) != (adapter.B.shape[0], adapter.A.shape[1]):
            raise LoraFileError(
                f"{_label(lora)}: layer {layer!r} has delta shape (out, in) {(adapter.B.shape[0], adapter.A.shape[1])}"
                f" but the U-Net's weight is {tuple(weight.shape)}; a LoRA for another base architecture"
            )


def unet_skeleton(model_source: str | Path):
    """The denoiser (U-Net, or SD3 / FLUX transformer) of a diffusers pipeline (directory or hub
    id), built from its config on the meta device: its layer names and shapes for
    :func:`check_fits_unet`, without reading any weights."""
    import diffusers
    from accelerate import init_empty_weights

    component, class_name = "unet", "UNet2DConditionModel"
    try:
        index = diffusers.DiffusionPipeline.load_config(str(model_source))
    except (OSError, ValueError):  # no model_index.json: a bare U-Net's config
        index = {}
    if "transformer" in index and "unet" not in index:
        component, class_name = "transformer", index["transformer"][1]
    model_class = getattr(diffusers, class_name)
    config = model_class.load_config(str(model_source), subfolder=component)
    with init_empty_weights():
        return model_class.from_config(config)
