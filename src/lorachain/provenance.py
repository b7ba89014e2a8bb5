"""What produced a result: package versions, the lorachain checkout's git commit, and the exact
model (the hub commit a hub id resolved to, or a fingerprint of a local directory's configs).

Every value is the same on the same machine and checkout, so recording it keeps results
byte-identical between two runs of one config (no timestamps, hostnames or run-specific paths).
Import-light (no torch): versions come from ``importlib.metadata``, the hub revision from the
local Hugging Face cache (the snapshot directory a ref points to is named by its commit hash),
asking the hub only when it is online and the cache does not know the model.

A hub model may be pinned as ``owner/name@revision`` (what ``model.revision`` becomes in the
workflow, the notation of huggingface_hub's ``HfFileSystem``); :func:`split_revision` takes it
apart for ``from_pretrained(..., revision=...)``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

PACKAGES = ("torch", "diffusers", "peft", "transformers", "accelerate", "lorachain")
# The flat columns every table carries (see columns()).
COLUMNS = (*PACKAGES, "git_commit", "git_dirty", "model_revision")
# The files of a local model directory that say what it is (hashed; the weights are not).
CONFIG_SUFFIXES = (".json", ".txt")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
# Files one of which every diffusers/transformers model directory holds (for the cache lookup).
_INDEX_FILES = ("model_index.json", "config.json")


class ProvenanceError(ValueError):
    """A model source and revision that do not go together; the message names the config key."""


def versions() -> dict[str, str | None]:
    """The installed version of each of PACKAGES (None: not installed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git(directory: Path, *arguments: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *arguments], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):  # no git installed, or a hung filesystem
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def _git_state(directory: Path) -> tuple[str | None, bool | None]:
    commit = _git(directory, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    # tracked files only, as `git describe --dirty`: results and caches are not the code
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return commit.strip(), None if status is None else bool(status.strip())


def git_state(directory: str | Path | None = None) -> dict:
    """{"commit", "dirty"} of the git checkout holding `directory` (default: the lorachain
    package's own source); both None outside a checkout (an installed wheel)."""
    where = Path(directory) if directory is not None else Path(__file__).resolve().parent
    commit, dirty = _git_state(where.resolve())
    return {"commit": commit, "dirty": dirty}


def is_hub_id(source: str) -> bool:
    """`source` has the shape of a hub id (owner/name) and is not an existing path."""
    return bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()


def split_revision(source: str) -> tuple[str, str | None]:
    """("owner/name", "revision") of a pinned hub id ``owner/name@revision``; anything else
    (a hub id without a pin, a local path, even one with '@' in its name) as (source, None)."""
    head, at, revision = str(source).rpartition("@")
    if at and revision and is_hub_id(head) and not Path(source).expanduser().exists():
        return head, revision
    return str(source), None


def pin_revision(source: str, revision: str | None, key: str = "model.revision") -> str:
    """`source` pinned to `revision` (``owner/name@revision``); `source` itself without one. A
    revision only pins a hub id: with a local directory it is an error naming `key`."""
    if not revision:
        return str(source)
    if not is_hub_id(str(source)):
        raise ProvenanceError(
            f"config key {key}: {revision!r} pins a hub revision, but the model {str(source)!r} is a local path, "
            f"not a hub id (owner/name); remove {key} (a local directory has no revisions)"
        )
    return f"{source}@{revision}"


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE  # what from_pretrained in this process used


def cached_revision(repo_id: str, revision: str | None = None) -> str | None:
    """The commit hash the local hub cache resolves `repo_id` at `revision` (a branch, tag or
    commit; default main) to: the name of the snapshot directory its ref points to."""
    from huggingface_hub import try_to_load_from_cache

    for filename in _INDEX_FILES:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=_cache_dir(), revision=revision)
        if isinstance(found, str):
            return Path(found).parent.name
    return None


def _online() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false")


def hub_revision(repo_id: str, revision: str | None = None) -> str | None:
    """The commit hash of `repo_id` at `revision`: from the cache, else from the hub when online,
    else None (not resolvable here)."""
    found = cached_revision(repo_id, revision)
    if found is None and revision and _SHA.match(revision):
        return revision  # a full commit hash names itself
    if found is None and _online():
        from huggingface_hub import HfApi

        try:
            return HfApi().model_info(repo_id, revision=revision).sha
        except Exception:  # noqa: BLE001 - no network, no such repo: provenance stays unknown, loading reports it
            return None
    return found


def config_fingerprint(directory: str | Path) -> str:
    """sha256 of a local model directory's config files (model_index.json, each component's
    config, tokenizer files; not the weights), each hashed with its relative path."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.suffix in CONFIG_SUFFIXES:
            digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def model_record(source: str | Path, revision: str | None = None) -> dict:
    """What a model is: {"source", "kind": "hub" | "local", "revision" (the commit hash, None
    where unknown), "requested_revision", "fingerprint" (a local directory's config_fingerprint)}.
    `source` may carry its pin (``owner/name@revision``)."""
    source, pinned = split_revision(str(source))
    revision = revision or pinned
    if is_hub_id(source):
        resolved = hub_revision(source, revision)
        return {
            "source": source,
            "kind": "hub",
            "revision": resolved,
            "requested_revision": revision,
            "fingerprint": None,
        }
    directory = Path(source).expanduser()
    # a snapshot directory of the hub cache is named by its commit
    in_cache = directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--")
    return {
        "source": source,
        "kind": "local",
        "revision": directory.name if in_cache and _SHA.match(directory.name) else None,
        "requested_revision": revision,
        "fingerprint": config_fingerprint(directory) if directory.is_dir() else None,
    }


def record(model_source: str | Path | None, revision: str | None = None) -> dict:
    """The provenance of a result made from `model_source`: {"versions", "git", "model"}."""
    return {
        "versions": versions(),
        "git": git_state(),
        "model": None if model_source is None else model_record(model_source, revision),
    }


def table_columns(model_source: str | Path | None) -> dict:
    """The provenance columns of a table written now from results of `model_source`."""
    return columns(record(model_source))


def add_columns(frame, model_source: str | Path | None):
    """`frame` (a pandas table) with the provenance columns (COLUMNS) appended, the same on every row."""
    for name, value in table_columns(model_source).items():
        frame[name] = value
    return frame


def columns(provenance: dict) -> dict:
    """A record as flat table columns (COLUMNS): the versions, git_commit, git_dirty and
    model_revision (the hub commit, or ``local:<fingerprint prefix>`` for a local directory)."""
    model = provenance.get("model") or {}
    revision = model.get("revision")
    if revision is None and model.get("fingerprint"):
        revision = f"local:{model['fingerprint'][:16]}"
    git = provenance.get("git") or {}
    versions_ = provenance.get("versions") or {}
    return {
        **{name: versions_.get(name) for name in PACKAGES},
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "model_revision": revision,
    }
