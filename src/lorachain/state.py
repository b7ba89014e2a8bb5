"""What passes from task to task, and how it is stored.

On disk a task leaves only its own LoRA (a standard diffusers LoRA file that
``pipe.load_lora_weights`` accepts) and a small JSON manifest that points at the previous task's
state. The base pipeline is referenced, never copied. Loading a state replays the chain of LoRA
files through the method's ``fold`` deterministically and hands the method only the result: the
merged delta of every targeted layer (W_{t-1} - W0) and the previous adapter, which is exactly what
the strict regime allows. Bytes per task are those of one LoRA (SDXL rank 64: 93 M parameters,
0.37 GB in fp32) instead of a full pipeline (about 14 GB in fp32).

A task trained with embedding-weight tuning (a method's ``embeddings`` parameter) also leaves
``embeddings.safetensors`` beside its LoRA: the concept token's vectors of each text encoder
(``clip_l``: (vectors, width) of ``text_encoder``; ``clip_g``: of SDXL's ``text_encoder_2``), the
token and phrase in its metadata, recorded in the manifest (``embeddings``: token, phrase,
vectors, file, bytes, sha256) and checked on load like the LoRA file. It is the textual-inversion
layout stock diffusers reads (``pipe.load_textual_inversion``; :mod:`lorachain.embeddings` loads
it for sampling). A state without embeddings writes exactly what it wrote before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorachain.files import canonical_safetensors, sha256_file
from lorachain.lora import LayerAdapter, LoraFileError, parse_lora
from lorachain.methods.base import ContinualMethod
from lorachain.models.denoisers import denoiser_component
from lorachain.paths import LORA_FILE, STATE_FILE
from lorachain.torch_env import torch

STATE_FORMAT = 2  # 2: the manifest records the LoRA file's sha256 (format 1 only its byte count)
READABLE_FORMATS = (1, 2)
_UNET_PREFIX = "unet."
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"  # what write_task_state writes


EMBEDDINGS_FILE = "embeddings.safetensors"
# The key of each text encoder's vectors in EMBEDDINGS_FILE, by pipeline attribute (the names
# SDXL textual-inversion files use).
ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
EMBEDDINGS_FORMAT = "lorachain-embeddings-1"


class StateError(RuntimeError):
    """A state that cannot be used (missing, incomplete, or from another run); names the file."""


@dataclass
class FoldedState:
    """The model after some tasks, as a method is allowed to see it."""

    tasks_done: int
    merged: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> W - W0 (absent: zero)
    adapter: dict[str, LayerAdapter] | None = None  # the last task's adapter
    adapter_live: bool = False  # the adapter is part of the model (not merged into `merged`)
    # the chain's states with concept token embeddings: (embeddings file, token); a pipeline whose
    # U-Net gets this state must have those tokens loaded (lorachain.embeddings)
    embeddings: list[tuple[Path, str]] = field(default_factory=list)

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
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise StateError(
            f"{path}: state format {found!r}, this lorachain reads formats {READABLE_FORMATS}; {_rerun_hint(task_dir)}"
        )
    lora = Path(task_dir) / LORA_FILE
    if not lora.is_file():
        raise StateError(f"{lora}: LoRA file of a finished task is missing; {_rerun_hint(task_dir)}")
    if manifest.get("embeddings") is not None and not (Path(task_dir) / EMBEDDINGS_FILE).is_file():
        raise StateError(
            f"{Path(task_dir) / EMBEDDINGS_FILE}: the embeddings file of a finished task is missing; "
            f"{_rerun_hint(task_dir)}"
        )
    return manifest


def _rerun_hint(task_dir: str | Path) -> str:
    return (
        f"delete the directory {Path(task_dir).absolute()} and rerun the workflow: Snakemake retrains that task "
        "and everything that was built on it"
    )


def lora_file_record(path: str | Path) -> dict:
    """What the manifest records of a LoRA file: its byte count and sha256."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def check_lora_file(task_dir: str | Path, manifest: dict, data: bytes) -> None:
    """`data` (the task's LoRA file, read once) is what its manifest recorded: the byte count, and
    the sha256 where recorded."""
    recorded = manifest.get("bytes", {}).get("lora") if isinstance(manifest.get("bytes"), dict) else None
    digest = manifest.get("sha256", {}).get("lora") if isinstance(manifest.get("sha256"), dict) else None
    _check_recorded_file(task_dir, LORA_FILE, data, recorded, digest)


def _check_recorded_file(task_dir, name: str, data: bytes, recorded: int | None, digest: str | None) -> None:
    """`data` (the file `name` of a task, read once) has the byte count and the sha256 that the
    task's manifest recorded (each checked where recorded)."""
    task_dir = Path(task_dir).absolute()
    path, manifest = task_dir / name, task_dir / STATE_FILE
    if recorded is not None and len(data) != recorded:
        raise StateError(
            f"{path}: {len(data)} bytes, but {manifest} recorded {recorded} bytes when the task finished "
            f"(the file was truncated, replaced or damaged); {_rerun_hint(task_dir)}"
        )
    if digest is not None and (actual := hashlib.sha256(data).hexdigest()) != digest:
        raise StateError(
            f"{path}: sha256 {actual[:16]}..., but {manifest} recorded {digest[:16]}... when the task "
            f"finished (the file was changed or damaged since); {_rerun_hint(task_dir)}"
        )


@dataclass(frozen=True)
class ConceptEmbeddings:
    """A concept's trained token vectors: `vectors[key]` is (vectors, width) for the text encoder
    that ENCODER_KEYS names `key`; the first row is `token`'s, row i > 0 is token_i's."""

    token: str
    phrase: str
    vectors: dict[str, torch.Tensor]

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def embeddings_record(manifest: dict) -> dict | None:
    """The manifest's record of the state's embeddings file, or None (no embedding tuning)."""
    return manifest.get("embeddings")


def read_state_embeddings(task_dir: str | Path, manifest: dict) -> ConceptEmbeddings | None:
    """The state's concept embeddings (None without), after checking the file against its manifest."""
    from safetensors.torch import load

    record = embeddings_record(manifest)
    if record is None:
        return None
    task_dir = Path(task_dir).absolute()
    path = task_dir / EMBEDDINGS_FILE
    data = path.read_bytes()
    _check_recorded_file(task_dir, EMBEDDINGS_FILE, data, record["bytes"], record["sha256"])
    vectors = load(data)
    expected = {key for key in ENCODER_KEYS.values() if key in vectors}
    if not vectors or set(vectors) != expected or {v.shape[0] for v in vectors.values()} != {record["vectors"]}:
        raise StateError(
            f"{path}: tensors {sorted(vectors)} of {sorted({tuple(v.shape) for v in vectors.values()})}, but "
            f"{task_dir / STATE_FILE} records {record['vectors']} vectors of {sorted(ENCODER_KEYS.values())[:1]} "
            f"(and clip_g on SDXL); {_rerun_hint(task_dir)}"
        )
    return ConceptEmbeddings(token=record["token"], phrase=record["phrase"], vectors=vectors)


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
            raise StateError(
                f"{directory / STATE_FILE}: task_index {manifest['task_index']} at position {position} of its chain"
            )
        for key in ("method", "base_model", "architecture", "run"):
            if manifest.get(key) != first.get(key):
                raise StateError(
                    f"{directory / STATE_FILE}: {key} {manifest.get(key)!r} differs from the chain's first task "
                    f"({first.get(key)!r}); states of different runs cannot be chained"
                )
    return chain


def _recorded_scale(manifest: dict) -> float:
    """peft's scale of a state's LoRA: lora_alpha / rank, or rsLoRA's lora_alpha / sqrt(rank) when
    the manifest records training.use_rslora."""
    rank = manifest["rank"]
    if manifest.get("training_options", {}).get("use_rslora"):
        return manifest["lora_alpha"] / math.sqrt(rank)
    return manifest["lora_alpha"] / rank


def load_adapters(task_dir: str | Path, manifest: dict) -> dict[str, LayerAdapter]:
    """The task's LoRA factors, after checking the file against its manifest: bytes and sha256,
    then the one LoRA reader (:func:`lorachain.lora.parse_lora`, strict: nothing but a lora_B for
    every lora_A and back), then the manifest's rank and layer count. The scale is the manifest's
    lora_alpha / rank."""
    task_dir = Path(task_dir).absolute()
    lora = task_dir / LORA_FILE
    data = lora.read_bytes()  # one read: checked against the manifest, then parsed
    check_lora_file(task_dir, manifest, data)
    try:
        factors = parse_lora(data, lora, strict=True).adapters
    except LoraFileError as error:
        raise StateError(f"{error}; {_rerun_hint(task_dir)}") from None
    rank, layers_recorded = manifest["rank"], manifest.get("layers")
    adapters = {}
    for layer in sorted(factors):
        A, B = factors[layer].A, factors[layer].B
        if A.shape[0] != rank or B.shape[1] != rank:
            key, other = f"{_UNET_PREFIX}{layer}{_A_SUFFIX}", f"{_UNET_PREFIX}{layer}{_B_SUFFIX}"
            raise StateError(
                f"{lora}: {key!r} has shape {tuple(A.shape)} and {other!r} {tuple(B.shape)}, "
                f"but {task_dir / STATE_FILE} "
                f"records rank {rank} (factors (r, in) and (out, r)); {_rerun_hint(task_dir)}"
            )
        adapters[layer] = LayerAdapter(A=A, B=B, scale=_recorded_scale(manifest))
    if not adapters or (layers_recorded is not None and len(adapters) != layers_recorded):
        raise StateError(
            f"{lora}: {len(adapters)} LoRA layers, but {task_dir / STATE_FILE} records {layers_recorded}; "
            f"{_rerun_hint(task_dir)}"
        )
    return adapters


def fold_state(task_dir: str | Path | None, method: ContinualMethod, device="cpu") -> FoldedState:
    """Replay the chain ending at `task_dir` through `method.fold` (None: the base model)."""
    if task_dir is None:
        return FoldedState(tasks_done=0)
    chain = read_chain(task_dir)
    written_by = chain[-1][1]["method"]
    if written_by != {"name": method.name, "params": method.params}:
        raise StateError(
            f"{Path(task_dir) / STATE_FILE}: written by method {written_by}, "
            f"not {{'name': {method.name!r}, 'params': {method.params}}}; "
            "a chain continues only with the method and parameters that started it"
        )
    merged: dict[str, torch.Tensor] = {}
    adapters: dict[str, LayerAdapter] = {}
    for directory, manifest in chain:
        adapters = load_adapters(directory, manifest)
        for layer in sorted(adapters):
            adapter = adapters[layer]
            delta = adapter.scale * (adapter.B.to(device) @ adapter.A.to(device))
            folded = method.fold(merged.get(layer), delta)
            if folded is not None:
                merged[layer] = folded
    embeddings = [
        (directory / EMBEDDINGS_FILE, embeddings_record(manifest)["token"])
        for directory, manifest in chain
        if embeddings_record(manifest) is not None
    ]
    return FoldedState(
        tasks_done=len(chain),
        merged=merged,
        adapter=adapters,
        adapter_live=method.adapter_stays_live,
        embeddings=embeddings,
    )


# The attribute of a U-Net that holds the states with embeddings applied to it: (file, token).
NEEDS_EMBEDDINGS = "_lorachain_needs_embeddings"


@torch.no_grad()
def apply_to_unet(unet, state: FoldedState) -> None:
    """Turn a U-Net holding W0 into the model of `state` (W0 + merged + live adapter)."""
    modules = dict(unet.named_modules())
    for layer in state.layers():
        if layer not in modules:
            raise StateError(
                f"state layer {layer!r} does not exist in this denoiser: the state comes from another architecture"
            )
        weight = modules[layer].weight
        delta = state.layer_delta(layer)
        if delta.shape != weight.shape:
            raise StateError(
                f"state layer {layer!r} has shape {tuple(delta.shape)}, the denoiser's is {tuple(weight.shape)}"
            )
        weight.copy_((weight.float() + delta.to(weight.device, torch.float32)).to(weight.dtype))
    if state.embeddings:  # the samplers check that a pipeline with this U-Net has these tokens
        setattr(unet, NEEDS_EMBEDDINGS, [*getattr(unet, NEEDS_EMBEDDINGS, []), *state.embeddings])


def _readable_by_group(path: Path) -> None:
    """The LoRA writer creates its file 0600; states are shared on clusters, so honour the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sorted_sets(value):
    """peft's LoraConfig holds target_modules as a set; diffusers writes it as list(set), whose
    order follows the hash seed. Sorted, the metadata (and so the file) is byte-reproducible."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {key: _sorted_sets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sorted_sets(item) for item in value]
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_embeddings_file(path: Path, embeddings: ConceptEmbeddings) -> dict:
    """Write a concept's vectors (fp32, keys clip_l / clip_g) with canonical bytes; its record."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in embeddings.vectors.items()}
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    metadata = {"format": EMBEDDINGS_FORMAT, "token": embeddings.token, "phrase": embeddings.phrase}
    save_file(tensors, staging, metadata=metadata)
    canonical_safetensors(staging)
    os.replace(staging, path)
    _readable_by_group(path)
    record = lora_file_record(path)
    return {
        "token": embeddings.token,
        "phrase": embeddings.phrase,
        "vectors": embeddings.count,
        "file": path.name,
        "bytes": record["bytes"],
        "sha256": record["sha256"],
    }


def write_task_state(
    output_dir: str | Path,
    adapters: dict[str, LayerAdapter],
    manifest: dict,
    pipeline_class,
    lora_config: dict,
    embeddings: ConceptEmbeddings | None = None,
) -> int:
    """Write the task's LoRA (diffusers format), its concept embeddings (if any) and its manifest;
    the manifest goes last, so a directory with a manifest is complete. Returns the bytes written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = {}
    for layer in sorted(adapters):
        layers[f"{layer}.lora_A.weight"] = adapters[layer].A.detach().to("cpu", torch.float32).contiguous()
        layers[f"{layer}.lora_B.weight"] = adapters[layer].B.detach().to("cpu", torch.float32).contiguous()
    staging = output_dir / f".staging{os.getpid()}"
    staging.mkdir(exist_ok=True)
    component = denoiser_component(pipeline_class.__name__)
    pipeline_class.save_lora_weights(  # keys unet.<layer>... or, for SD3 / FLUX, transformer.<layer>...
        staging, **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": _sorted_sets(lora_config)}
    )
    canonical_safetensors(staging / LORA_FILE)
    os.replace(staging / LORA_FILE, output_dir / LORA_FILE)
    staging.rmdir()
    _readable_by_group(output_dir / LORA_FILE)
    record = lora_file_record(output_dir / LORA_FILE)
    manifest = {
        "format": STATE_FORMAT,
        **manifest,
        "layers": len(adapters),
        "bytes": {"lora": record["bytes"]},
        "sha256": {"lora": record["sha256"]},
    }
    written = record["bytes"]
    if embeddings is not None:
        manifest["embeddings"] = write_embeddings_file(output_dir / EMBEDDINGS_FILE, embeddings)
        written += manifest["embeddings"]["bytes"]
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _atomic_write_text(output_dir / STATE_FILE, text)
    return written + len(text.encode())
