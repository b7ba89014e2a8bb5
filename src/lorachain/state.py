"""What passes from task to task, and how it is stored.

On disk a task leaves only its own LoRA (a standard diffusers LoRA file that
``pipe.load_lora_weights`` accepts) and a small JSON manifest that points at the previous task's
state. The base pipeline is referenced, never copied. Loading a state replays the chain of LoRA
files through the method's ``fold`` deterministically and hands the method only the result: the
merged delta of every targeted layer (W_{t-1} - W0) and the previous adapter, which is exactly what
the strict regime allows. Bytes per task are those of one LoRA (SDXL rank 64: 93 M parameters,
0.37 GB in fp32) instead of a full pipeline (about 14 GB in fp32).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorachain.methods.base import ContinualMethod, LayerAdapter
from lorachain.torch_env import torch

STATE_FILE = "state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(dir) looks for
STATE_FORMAT = 1
_UNET_PREFIX = "unet."


class StateError(RuntimeError):
    """A state that cannot be used (missing, incomplete, or from another run); names the file."""


@dataclass
class FoldedState:
    """The model after some tasks, as a method is allowed to see it."""

    tasks_done: int
    merged: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> W - W0 (absent: zero)
    adapter: dict[str, LayerAdapter] | None = None  # the last task's adapter
    adapter_live: bool = False  # the adapter is part of the model (not merged into `merged`)

    def layer_delta(self, layer: str) -> torch.Tensor | None:
        """W_after - W0 of one layer, or None where the state leaves the layer untouched."""
        delta = self.merged.get(layer)
        if self.adapter_live and self.adapter is not None and layer in self.adapter:
            live = self.adapter[layer].delta()
            delta = live if delta is None else delta + live
        return delta

    def layers(self) -> list[str]:
        names = set(self.merged)
        if self.adapter_live and self.adapter:
            names |= set(self.adapter)
        return sorted(names)


def read_manifest(task_dir: str | Path) -> dict:
    path = Path(task_dir) / STATE_FILE
    if not path.is_file():
        raise StateError(f"{path}: state manifest missing; the task that writes it did not finish (rerun it)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StateError(f"{path}: not valid JSON ({error}); delete the task directory and rerun it") from None
    if manifest.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: state format {manifest.get('format')!r}, this lorachain reads format {STATE_FORMAT}")
    lora = Path(task_dir) / LORA_FILE
    if not lora.is_file():
        raise StateError(f"{lora}: LoRA file of a finished task is missing; delete {task_dir} and rerun that task")
    return manifest


def read_chain(task_dir: str | Path) -> list[tuple[Path, dict]]:
    """(directory, manifest) of every task from the first up to `task_dir`, checked for consistency."""
    chain = []
    current: Path | None = Path(task_dir)
    while current is not None:
        manifest = read_manifest(current)
        chain.append((current, manifest))
        parent = manifest.get("parent")
        current = (current / parent).resolve() if parent else None
    chain.reverse()
    first = chain[0][1]
    for position, (directory, manifest) in enumerate(chain, start=1):
        if manifest["task_index"] != position:
            raise StateError(f"{directory / STATE_FILE}: task_index {manifest['task_index']} at position {position} of its chain")
        for key in ("method", "base_model", "architecture", "run"):
            if manifest.get(key) != first.get(key):
                raise StateError(
                    f"{directory / STATE_FILE}: {key} {manifest.get(key)!r} differs from the chain's first task "
                    f"({first.get(key)!r}); states of different runs cannot be chained"
                )
    return chain


def load_adapters(task_dir: str | Path, manifest: dict) -> dict[str, LayerAdapter]:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(task_dir) / LORA_FILE))
    scale = manifest["lora_alpha"] / manifest["rank"]
    adapters = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            layer = key[len(_UNET_PREFIX) : -len(".lora_A.weight")] if key.startswith(_UNET_PREFIX) else key[: -len(".lora_A.weight")]
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            adapters[layer] = LayerAdapter(A=A.float(), B=B.float(), scale=scale)
    return adapters


def fold_state(task_dir: str | Path | None, method: ContinualMethod, device="cpu") -> FoldedState:
    """Replay the chain ending at `task_dir` through `method.fold` (None: the base model)."""
    if task_dir is None:
        return FoldedState(tasks_done=0)
    chain = read_chain(task_dir)
    written_by = chain[-1][1]["method"]
    if written_by != {"name": method.name, "params": method.params}:
        raise StateError(
            f"{Path(task_dir) / STATE_FILE}: written by method {written_by}, not {{'name': {method.name!r}, 'params': {method.params}}}; "
            "a chain continues only with the method and parameters that started it"
        )
    merged: dict[str, torch.Tensor] = {}
    adapters: dict[str, LayerAdapter] = {}
    for directory, manifest in chain:
        adapters = load_adapters(directory, manifest)
        for layer in sorted(adapters):
            adapter = adapters[layer]
            delta = (adapter.scale * (adapter.B.to(device) @ adapter.A.to(device)))
            folded = method.fold(merged.get(layer), delta)
            if folded is not None:
                merged[layer] = folded
    return FoldedState(tasks_done=len(chain), merged=merged, adapter=adapters, adapter_live=method.adapter_stays_live)


@torch.no_grad()
def apply_to_unet(unet, state: FoldedState) -> None:
    """Turn a U-Net holding W0 into the model of `state` (W0 + merged + live adapter)."""
    modules = dict(unet.named_modules())
    for layer in state.layers():
        if layer not in modules:
            raise StateError(f"state layer {layer!r} does not exist in this U-Net: the state comes from another architecture")
        weight = modules[layer].weight
        delta = state.layer_delta(layer)
        if delta.shape != weight.shape:
            raise StateError(f"state layer {layer!r} has shape {tuple(delta.shape)}, the U-Net's is {tuple(weight.shape)}")
        weight.copy_((weight.float() + delta.to(weight.device, torch.float32)).to(weight.dtype))


def _readable_by_group(path: Path) -> None:
    """The LoRA writer creates its file 0600; states are shared on clusters, so honour the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_task_state(
    output_dir: str | Path,
    adapters: dict[str, LayerAdapter],
    manifest: dict,
    pipeline_class,
    lora_config: dict,
) -> int:
    """Write the task's LoRA (diffusers format) and its manifest; the manifest goes last, so a
    directory with a manifest is complete. Returns the bytes written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = {}
    for layer in sorted(adapters):
        layers[f"{layer}.lora_A.weight"] = adapters[layer].A.detach().to("cpu", torch.float32).contiguous()
        layers[f"{layer}.lora_B.weight"] = adapters[layer].B.detach().to("cpu", torch.float32).contiguous()
    staging = output_dir / f".staging{os.getpid()}"
    staging.mkdir(exist_ok=True)
    pipeline_class.save_lora_weights(staging, unet_lora_layers=layers, unet_lora_adapter_metadata=lora_config)
    os.replace(staging / LORA_FILE, output_dir / LORA_FILE)
    staging.rmdir()
    _readable_by_group(output_dir / LORA_FILE)
    lora_bytes = (output_dir / LORA_FILE).stat().st_size
    manifest = {"format": STATE_FORMAT, **manifest, "bytes": {"lora": lora_bytes}}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _atomic_write_text(output_dir / STATE_FILE, text)
    return lora_bytes + len(text.encode())
