"""Byte-level file helpers shared by every writer: digests and reproducible safetensors files.

safetensors keeps a file's metadata in a Rust ``HashMap``, whose iteration order is randomised per
process, so the same tensors and metadata give header bytes in a different order from one process to
the next (a file with two or more metadata keys, such as diffusers' LoRA files with ``format`` and
``lora_adapter_metadata``, differs in its sha256 between two identical runs).
:func:`canonical_safetensors` rewrites the header with sorted keys; the tensors' bytes are untouched
and every safetensors reader sees the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

_HEADER_LENGTH = struct.Struct("<Q")
_ALIGNMENT = 8  # safetensors pads its header with spaces to a multiple of 8 bytes


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _canonical_header(header: dict) -> bytes:
    ordered = {key: header[key] for key in sorted(header)}
    if "__metadata__" in ordered and isinstance(ordered["__metadata__"], dict):
        ordered["__metadata__"] = dict(sorted(ordered["__metadata__"].items()))
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def canonical_safetensors(path: str | os.PathLike[str]) -> None:
    """Rewrite a safetensors file's header with sorted keys, in place (same length: the same
    entries reordered) or, if it would not fit, by rewriting the file."""
    path = Path(path)
    with open(path, "r+b") as handle:
        (length,) = _HEADER_LENGTH.unpack(handle.read(_HEADER_LENGTH.size))
        header = json.loads(handle.read(length))
        canonical = _canonical_header(header)
        if len(canonical) <= length:
            handle.seek(_HEADER_LENGTH.size)
            handle.write(canonical.ljust(length, b" "))
            return
        data = handle.read()
    padded = canonical.ljust(-(-len(canonical) // _ALIGNMENT) * _ALIGNMENT, b" ")
    temporary = path.with_name(f".{path.name}.canonical{os.getpid()}")
    temporary.write_bytes(_HEADER_LENGTH.pack(len(padded)) + padded + data)
    os.replace(temporary, path)


# ------------------------------------------------------------------ models the workflow built
# A tiny pipeline or encoder that a workflow rule built carries this marker, so that an error in
# loading it names the config key that asked for it (model.tiny, metrics.<name>.tiny) and says
# that deleting the directory makes the workflow build it again, instead of blaming a path the
# user never wrote.
BUILT_MARKER = "lorachain-built.json"


def write_built_marker(directory: str | os.PathLike[str], config_key: str, **details) -> None:
    text = json.dumps({"config_key": config_key, **details}, indent=2, sort_keys=True) + "\n"
    (Path(directory) / BUILT_MARKER).write_text(text)


def built_by_workflow(source: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(directory, config key) when `source` (a directory or a file in it) was built by a rule."""
    path = Path(source).expanduser()
    for directory in (path, path.parent):
        marker = directory / BUILT_MARKER
        if marker.is_file():
            try:
                return directory, json.loads(marker.read_text())["config_key"]
            except (OSError, ValueError, KeyError, TypeError):
                return directory, "the tiny model's config key"
    return None


def loading_error_prefix(source: str | os.PathLike[str], key: str) -> tuple[str, str]:
    """(what the message starts with, the fix it ends with) for a model that cannot be loaded."""
    built = built_by_workflow(source)
    if built is None:
        return f"config key {key}", ""
    directory, built_key = built
    return (
        f"config key {built_key} (built by the workflow in {directory})",
        f"; delete {directory} and rerun: the workflow builds it again",
    )
