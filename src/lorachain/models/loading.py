"""Load real pipelines (hub id or local path) and the tiny ones with the same code."""

from __future__ import annotations

import os
from pathlib import Path

from lorachain.files import loading_error_prefix
from lorachain.provenance import split_revision
from lorachain.torch_env import torch


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message names the source and the config key."""


def _resolve(source: str, key: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local directory)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"config key {key}: {source!r} is a file; give the directory written by save_pretrained")
        return str(path), True
    parts = source.split("/")
    if len(parts) == 2 and all(parts) and not source.startswith((".", "~")):
        return source, False  # a hub id: owner/name
    raise ModelError(f"config key {key}: {source!r} is neither an existing directory nor a hub id (owner/name)")


def _from_pretrained(cls, source: str, key: str, **kwargs):
    # a hub id pinned by the config's revision key arrives as owner/name@revision
    source, revision = split_revision(source)
    resolved, local = _resolve(source, key)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    if revision:
        kwargs["revision"] = revision
    try:
        return cls.from_pretrained(resolved, local_files_only=local or offline, **kwargs)
    except (OSError, ValueError) as error:
        where = "directory" if local else "hub id (offline: only the local cache is searched)" if offline else "hub id"
        prefix, fix = loading_error_prefix(source, key)
        pinned = f" at revision {revision!r}" if revision else ""
        raise ModelError(f"{prefix}: cannot load {source!r}{pinned} as a {where}: {error}{fix}") from error


def load_pipeline(source: str | Path, vae: str | None = None, torch_dtype=torch.float32, key: str = "model.pretrained"):
    """A diffusers pipeline from a hub id or a directory written by ``save_pretrained``; `vae`
    optionally replaces its VAE (e.g. SDXL's fp16-fix VAE)."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    extra = {}
    if vae:
        extra["vae"] = _from_pretrained(AutoencoderKL, str(vae), "model.vae", dtype=torch_dtype)
    return _from_pretrained(DiffusionPipeline, str(source), key, dtype=torch_dtype, **extra)
