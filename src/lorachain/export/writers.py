"""The files of an export: a diffusers LoRA, the same in kohya keys, a fused U-Net, the record,
the SVD error table, the concept embeddings and a model card."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

from lorachain.export.factors import ExportedLayer, ExportError
from lorachain.export.sources import ExportSource
from lorachain.files import canonical_safetensors
from lorachain.models.denoisers import denoiser_component, refused_export_formats
from lorachain.paths import LORA_FILE
from lorachain.torch_env import torch

FORMATS = ("diffusers", "kohya", "unet", "transformer")
DIFFUSERS_FILE = LORA_FILE  # pipe.load_lora_weights(export_dir) finds it by this name
KOHYA_FILE = "lora_kohya.safetensors"
UNET_DIR = "unet"
RECORD_FILE = "export.json"
ERRORS_FILE = "svd-errors.csv"
CARD_FILE = "README.md"


def default_formats(architecture: str) -> tuple[str, ...]:
    return ("diffusers",) if denoiser_component(architecture) == "transformer" else ("diffusers", "kohya")


def format_problems(formats, architecture: str) -> list[str]:
    """Formats that do not exist for the architecture's denoiser, each with the fix."""
    fixes = {
        "kohya": "kohya keys are written by diffusers' U-Net converter only; export a "
        f"{architecture} LoRA in the diffusers format (which ComfyUI and kohya's sd-scripts read too)",
        "unet": f"a {architecture} has no U-Net; use 'transformer'",
        "transformer": f"{architecture or 'a U-Net pipeline'} has no transformer; use 'unet'",
    }
    refused = refused_export_formats(formats, denoiser_component(architecture))
    return [f"--format / export.formats: {fixes[name]}" for name in fixes if name in refused]


def peft_state_dict(layers: dict[str, ExportedLayer], prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The keys diffusers' save_lora_weights writes and load_lora_weights reads (scale 1: no alpha)."""
    tensors = {}
    for name in sorted(layers):
        tensors[f"{prefix}.{name}.lora_A.weight"] = layers[name].A.to(torch.float32).contiguous()
        tensors[f"{prefix}.{name}.lora_B.weight"] = layers[name].B.to(torch.float32).contiguous()
    return tensors


def file_metadata(source: ExportSource, layers: dict[str, ExportedLayer], summary: dict, key_format: str) -> dict:
    """What the safetensors header says about the export (all strings, as safetensors requires)."""
    ranks = sorted({layer.rank for layer in layers.values()})
    return {
        "format": "pt",
        "lorachain.keys": key_format,
        "lorachain.source": source.kind,
        "lorachain.base_model": source.base_model,
        "lorachain.architecture": source.architecture,
        "lorachain.method": json.dumps(source.method, sort_keys=True),
        "lorachain.concepts": json.dumps([item["concept"] for item in source.items]),
        "lorachain.trigger_prompts": json.dumps([item["train_prompt"] for item in source.items]),
        "lorachain.tokens": json.dumps([token for _, token in source.embeddings]),
        "lorachain.rank": str(ranks[-1]) if ranks else "0",
        "lorachain.exact": json.dumps(summary["exact"]),
        "lorachain.relative_error": f"{summary['relative_error']:.6g}",
    }


def _save(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    canonical_safetensors(path)  # metadata order is random per process: make the bytes reproducible
    umask = os.umask(0)  # safetensors creates files 0600; exports are for sharing: honour the umask
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_diffusers(out: Path, layers, metadata: dict, prefix: str = "unet") -> Path:
    _save(peft_state_dict(layers, prefix), out / DIFFUSERS_FILE, {**metadata, "lorachain.keys": "diffusers"})
    return out / DIFFUSERS_FILE


def write_kohya(out: Path, layers, metadata: dict) -> Path:
    """kohya / A1111 / ComfyUI keys (lora_unet_..., lora_down / lora_up, .alpha = rank: scale 1),
    by diffusers' own converter."""
    from diffusers.utils import convert_state_dict_to_kohya

    tensors = convert_state_dict_to_kohya(peft_state_dict(layers))
    _save(tensors, out / KOHYA_FILE, {**metadata, "lorachain.keys": "kohya"})
    return out / KOHYA_FILE


def write_denoiser(out: Path, source: ExportSource, base_model: str, component: str = "unet") -> Path:
    """The base model's U-Net (or SD3 / FLUX transformer) with the exact dense delta added
    (save_pretrained, safetensors), in directory `component` of `out`."""
    import diffusers

    from lorachain.state import FoldedState, apply_to_unet

    if not (Path(base_model) / component).is_dir() and not Path(base_model).is_dir():
        raise ExportError(
            f"{base_model}: the base model recorded in the state's manifest is not a directory here; "
            "give its location with --base-model (config key model.pretrained in the workflow), "
            f"or leave out the {component} format"
        )
    index = json.loads((Path(base_model) / "model_index.json").read_text())
    model_class = getattr(diffusers, index[component][1])  # UNet2DConditionModel, FluxTransformer2DModel, ...
    model = model_class.from_pretrained(base_model, subfolder=component)
    apply_to_unet(model, FoldedState(tasks_done=len(source.items), merged=source.dense()))
    model.save_pretrained(out / component)
    return out / component


def write_errors(out: Path, layers: dict[str, ExportedLayer]) -> Path:
    with open(out / ERRORS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["layer", "out_features", "in_features", "rank", "relative_error"])
        for name in sorted(layers):
            layer = layers[name]
            writer.writerow([name, layer.B.shape[0], layer.A.shape[1], layer.rank, f"{layer.relative_error:.6g}"])
    return out / ERRORS_FILE


def copy_embeddings(out: Path, source: ExportSource) -> list[dict]:
    """Each concept token's textual-inversion file beside the export, named after the token."""
    copied = []
    for path, token in source.embeddings:
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in token).strip("_")
        name = f"embeddings-{stem}.safetensors"
        shutil.copyfile(path, out / name)
        copied.append({"token": token, "file": name})
    return copied


def write_record(out: Path, record: dict) -> Path:
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out / RECORD_FILE
