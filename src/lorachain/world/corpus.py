"""Captioned images of a world: the pretraining corpus and the held-out sets.

Three kinds of image, each with its caption and labels:
* class: a coloured shape on a background, "a photo of a red star on a grey background" (parts of
  the caption dropped at random, so "a photo of a star" is a prompt the model knows);
* instance: a named individual, "a photo of karo star" (on a named background, sometimes said);
* styled: a class object in a named style, "peka image of stars".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorachain.data.selection import concept_phrase
from lorachain.world import scene
from lorachain.world.spec import WorldSpec

KIND_SHARES = {"class": 0.4, "instance": 0.4, "styled": 0.2}
CORPUS_STREAM, HELD_OUT_STREAM, CONCEPT_STREAM = 10, 11, 12


@dataclass
class Corpus:
    images: np.ndarray  # [n, H, W, 3] uint8
    captions: list[str]
    kinds: list[str]
    shapes: list[int]  # class index
    identities: list[int]  # instance index, -1 if none
    styles: list[int]  # style index, -1 if none


def class_caption(shape: str, colour: str, background: str, rng: np.random.Generator) -> str:
    variant = int(rng.integers(4))
    if variant == 0:
        return f"a photo of a {colour} {shape} on a {background} background"
    if variant == 1:
        return f"a photo of a {shape} on a {background} background"
    if variant == 2:
        return f"a photo of a {colour} {shape}"
    return f"a photo of a {shape}"


def instance_caption(name: str, shape: str, background: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return f"a photo of {name} {shape}"
    return f"a {name} {shape} on a {background} background"


def style_caption(style: str, shape: str, rng: np.random.Generator) -> str:
    phrase = concept_phrase(style)
    if rng.random() < 0.5:
        return f"{phrase} image of {scene.PLURALS[shape]}"
    return f"{phrase} image of a {shape}"


def draw_item(spec: WorldSpec, stream: int, index: int):
    """One (pixels, caption, kind, shape, identity, style) of the world, keyed by (stream, index)."""
    rng = np.random.default_rng([spec.seed, stream, index])
    size = spec.resolution
    roll = rng.random()
    background = list(scene.BACKGROUNDS)[int(rng.integers(len(scene.BACKGROUNDS)))]
    if roll < KIND_SHARES["class"]:
        shape = scene.CLASSES[int(rng.integers(len(scene.CLASSES)))]
        colour = list(scene.COLOURS)[int(rng.integers(len(scene.COLOURS)))]
        pixels = scene.render_object(shape, colour, background, size, rng)
        return pixels, class_caption(shape, colour, background, rng), "class", scene.CLASSES.index(shape), -1, -1
    if roll < KIND_SHARES["class"] + KIND_SHARES["instance"]:
        which = int(rng.integers(len(spec.instances)))
        item = spec.instances[which]
        pixels = scene.render_object(item.shape, item.colour, background, size, rng, item.marking, item.marking_colour)
        caption = instance_caption(item.name, item.shape, background, rng)
        return pixels, caption, "instance", scene.CLASSES.index(item.shape), which, -1
    which = int(rng.integers(len(spec.styles)))
    shape = scene.CLASSES[int(rng.integers(len(scene.CLASSES)))]
    pixels = scene.render_styled(spec.styles[which], shape, size, rng)
    return pixels, style_caption(spec.styles[which].name, shape, rng), "styled", scene.CLASSES.index(shape), -1, which


def build_corpus(spec: WorldSpec, count: int, stream: int = CORPUS_STREAM) -> Corpus:
    """`count` captioned images of the world (a pure function of the spec, the stream and count)."""
    images = np.empty((count, spec.resolution, spec.resolution, 3), np.uint8)
    columns = {"captions": [], "kinds": [], "shapes": [], "identities": [], "styles": []}
    for index in range(count):
        pixels, *labels = draw_item(spec, stream, index)
        images[index] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        for column, value in zip(columns.values(), labels):
            column.append(value)
    return Corpus(images=images, **columns)
