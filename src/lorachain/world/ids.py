"""A world's identity (torch-free: the workflow plan and the config checks use it)."""

from __future__ import annotations

import hashlib
import json

from lorachain.world.spec import world_block

SPEC_KEYS = ("seed", "resolution", "instances", "styles", "concepts", "images_per_concept")
# Bumped when a code change alters what a world contains: it is in the world id (encoders of
# another version are refused) and the world rules' `revision` param (plan.world_revision), so a
# cached world is rebuilt:
# 2 = large, centred objects (lorachain.world.scene._shape_mask).
CONTENTS_VERSION = 2


def world_id(block: dict | None) -> str:
    """What identifies a world: the keys that decide its contents (not how long models train)."""
    full = world_block(block)
    text = json.dumps({"version": CONTENTS_VERSION, **{key: full[key] for key in SPEC_KEYS}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
