"""A world's identity (torch-free: the workflow plan and the config checks use it)."""

from __future__ import annotations

import hashlib
import json

from lorachain.world.spec import world_block

SPEC_KEYS = ("seed", "resolution", "instances", "styles", "concepts", "images_per_concept")


def world_id(block: dict | None) -> str:
    """What identifies a world: the keys that decide its contents (not how long models train)."""
    full = world_block(block)
    text = json.dumps({key: full[key] for key in SPEC_KEYS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
