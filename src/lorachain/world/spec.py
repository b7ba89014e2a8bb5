"""A world's contents from its config block: pretraining instances and styles, and the concepts.

The config block (`world:` in a workflow config) sets sizes and seeds only; what the world holds
follows from them deterministically. Concepts are drawn from identities and looks that no
pretraining instance or style has, and (objects) one per class first, so that concepts of a
sequence belong to different prior classes, as in the papers' datasets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorachain.world import scene

DEFAULTS = {
    "seed": 0,
    "resolution": 32,
    "instances": 96,  # named pretraining individuals
    "styles": 10,  # named pretraining styles
    "concepts": {"objects": 8, "styles": 6},
    "images_per_concept": 5,
}


class WorldError(ValueError):
    """A world config that cannot be built; the message names the key."""


@dataclass(frozen=True)
class WorldSpec:
    seed: int
    resolution: int
    instances: tuple[scene.Instance, ...]
    styles: tuple[scene.Style, ...]
    object_concepts: tuple[scene.Instance, ...]
    style_concepts: tuple[scene.Style, ...]
    images_per_concept: int


def world_block(block: dict | None) -> dict:
    """The block with its defaults filled in (what a world depends on)."""
    block = dict(block or {})
    merged = {**DEFAULTS, **block}
    merged["concepts"] = {**DEFAULTS["concepts"], **(block.get("concepts") or {})}
    return merged


def check_world_block(block: dict, key: str = "world") -> list[str]:
    """Problems of a world block, each naming its key and the fix."""
    block = world_block(block)
    problems = []
    resolution = block["resolution"]
    if not isinstance(resolution, int) or resolution < 32 or resolution % 8:
        problems.append(
            f"config key {key}.resolution: {resolution!r} cannot be taken by the world's U-Net (a 4x VAE "
            "and one 2x downsampling need a multiple of 8, at least 32); use e.g. 32"
        )
    identities = len(scene.all_identities())
    looks = len(scene.all_looks())
    objects, styles = block["concepts"]["objects"], block["concepts"]["styles"]
    if block["instances"] + objects > identities:
        problems.append(
            f"config key {key}.instances + {key}.concepts.objects: {block['instances'] + objects} exceed the "
            f"{identities} identities the world has; lower them"
        )
    if objects > len(scene.CLASSES) * 4:
        problems.append(f"config key {key}.concepts.objects: at most {len(scene.CLASSES) * 4} object concepts")
    if styles > len(scene.CONCEPT_STYLE_NAMES):
        problems.append(
            f"config key {key}.concepts.styles: {styles} styles asked, the world has "
            f"{len(scene.CONCEPT_STYLE_NAMES)} style concepts; lower it"
        )
    if block["styles"] + styles > looks:
        problems.append(f"config key {key}.styles: {block['styles']} + {styles} concept styles exceed {looks} looks")
    if styles and styles + 1 > len(scene.CLASSES):
        problems.append(f"config key {key}.concepts.styles: at most {len(scene.CLASSES) - 1} (one object is held out)")
    if block["images_per_concept"] < 2:
        problems.append(f"config key {key}.images_per_concept: at least 2 (a concept needs references)")
    return problems


def build_spec(block: dict | None) -> WorldSpec:
    """The world a config block describes; raises WorldError naming the key if it cannot exist."""
    block = world_block(block)
    if problems := check_world_block(block):
        raise WorldError("; ".join(problems))
    seed = int(block["seed"])
    rng = np.random.default_rng([seed, 1])
    identities = scene.all_identities()
    order = rng.permutation(len(identities))
    # Concepts first, one per class in turn, then pretraining instances from what is left.
    concepts, taken = [], set()
    for index in order:
        shape = identities[index][0]
        count_of_shape = sum(concept[0] == shape for concept in concepts)
        if len(concepts) < block["concepts"]["objects"] and count_of_shape == len(concepts) // len(scene.CLASSES):
            concepts.append(identities[index])
            taken.add(index)
    remaining = [identities[i] for i in order if i not in taken]
    # Pretraining instances: spread over every class, so that each class word has named individuals.
    by_class = {shape: [ident for ident in remaining if ident[0] == shape] for shape in scene.CLASSES}
    chosen = [
        by_class[scene.CLASSES[i % len(scene.CLASSES)]][i // len(scene.CLASSES)] for i in range(block["instances"])
    ]
    names = scene.made_up_names(block["instances"] + block["styles"], seed)
    instances = tuple(scene.Instance(name, *ident) for name, ident in zip(names, chosen))

    # Concept styles: distinct palettes, and textures in turn, so that no two concepts look alike;
    # pretraining styles: looks whose (palette, texture) no concept has.
    palettes = rng.permutation(len(scene.PALETTES))
    textures = rng.permutation(len(scene.TEXTURE_KINDS))
    concept_looks = [
        (int(palettes[i]), scene.TEXTURE_KINDS[textures[i % len(textures)]], i % 3)
        for i in range(block["concepts"]["styles"])
    ]
    taken_looks = {look[:2] for look in concept_looks}
    looks = [look for look in scene.all_looks() if look[:2] not in taken_looks]
    style_looks = [looks[i] for i in rng.permutation(len(looks))[: block["styles"]]]
    styles = tuple(scene.Style(name, *look) for name, look in zip(names[block["instances"] :], style_looks))
    style_concepts = tuple(scene.Style(name, *look) for name, look in zip(scene.CONCEPT_STYLE_NAMES, concept_looks))
    object_concepts = tuple(
        scene.Instance(f"{marking}_{colour}_{shape}", shape, colour, marking, second)
        for shape, colour, marking, second in concepts
    )
    return WorldSpec(
        seed=seed,
        resolution=int(block["resolution"]),
        instances=instances,
        styles=styles,
        object_concepts=object_concepts,
        style_concepts=style_concepts,
        images_per_concept=int(block["images_per_concept"]),
    )
