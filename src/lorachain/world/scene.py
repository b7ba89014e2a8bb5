"""The miniature world: what exists in it, how it looks, and how it is captioned.

A small text-to-image universe in which the phenomena of personalization exist:

* **classes** are shapes (circle, square, ...), drawn in a named colour on a named background:
  "a photo of a red star on a grey background";
* **named instances**: many individuals of the classes, each with a detail that the class word
  alone does not produce (an inner dot, a band, an outline or a split in a second colour), and a
  made-up name that selects it: "a photo of karo star". As in real text-to-image models, the base
  model thereby learns that a rare word in front of a class selects an identity;
* **named styles**: global looks (a palette and a texture) applied to whole images of class
  objects, captioned the UnlearnCanvas way: "velmi image of stars".

Personalization concepts are new instances and new styles: combinations of details and looks that
no pretraining image shows, under names (DreamBooth's rare tokens, unseen style words) that no
pretraining caption contains. Every image is a pure function of its description and a NumPy
generator keyed by integers, so a world is reproducible byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from lorachain.data.synthetic import SHAPES, STYLE_PALETTES, _background, _texture
from lorachain.data.synthetic import _shape_mask as _synthetic_mask

CLASSES = SHAPES  # circle square triangle star diamond cross hexagon ring: single CLIP words
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in CLASSES}
COLOURS = {
    "red": (220, 35, 35),
    "blue": (35, 85, 225),
    "green": (30, 170, 60),
    "yellow": (245, 195, 20),
    "purple": (160, 45, 200),
    "orange": (250, 125, 15),
    "cyan": (20, 195, 200),
    "pink": (240, 80, 165),
}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (232, 232, 228), "black": (28, 28, 32), "beige": (214, 196, 160)}
MARKINGS = ("dot", "band", "outline", "split")
TEXTURE_KINDS = ("stripes", "dots", "checker", "waves", "noise")
PALETTES = STYLE_PALETTES + (  # (background, foreground, cast) of a style
    ((20, 60, 90), (240, 230, 90), (60, 200, 220)),
    ((120, 40, 60), (250, 240, 230), (230, 120, 120)),
)
# Made-up instance and style names for pretraining: consonant-vowel syllables, which the CLIP
# tokenizer splits into word pieces (so they are rare words, not vocabulary words).
_ONSETS = "bdfgklmnprtv"
_VOWELS = "aeiou"
# Names personalization uses (DreamBooth's rare tokens, the real UnlearnCanvas style names) and
# so must never occur in a pretraining caption.
RESERVED_NAMES = frozenset("sks zwz sbu uwu pdw twt zsn ofl psq cws byzantine dapple ink art pastel winter".split())
CONCEPT_STYLE_NAMES = (
    "Byzantine", "Dapple", "Ink_Art", "Pastel", "Winter", "Cubism", "Mosaic", "Rust",
)  # fmt: skip


@dataclass(frozen=True)
class Instance:
    """An individual of a class: body colour plus a marking in a second colour."""

    name: str
    shape: str
    colour: str
    marking: str
    marking_colour: str


@dataclass(frozen=True)
class Style:
    """A global look: a palette and a texture with a fixed geometry."""

    name: str
    palette: int
    texture: str
    geometry: int


def made_up_names(count: int, seed: int) -> list[str]:
    """`count` distinct two-syllable names ("karo", "mivu"), none a reserved name."""
    syllables = [onset + vowel for onset, vowel in product(_ONSETS, _VOWELS)]
    pairs = [a + b for a, b in product(syllables, syllables) if a != b and a + b not in RESERVED_NAMES]
    rng = np.random.default_rng([seed, 7])
    if count > len(pairs):
        raise ValueError(f"the world has at most {len(pairs)} made-up names, {count} asked")
    return [pairs[i] for i in rng.permutation(len(pairs))[:count]]


def all_identities() -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, marking, marking colour) with two different colours."""
    return [
        (shape, colour, marking, second)
        for shape, colour, marking, second in product(CLASSES, COLOURS, MARKINGS, COLOURS)
        if colour != second
    ]


def all_looks() -> list[tuple[int, str, int]]:
    """Every (palette, texture, geometry) a style can have."""
    return list(product(range(len(PALETTES)), TEXTURE_KINDS, range(3)))


# ----------------------------------------------------------------------------- rendering


def _marking_mask(marking: str, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where on the shape (mask) the marking colour goes."""
    size = mask.shape[0]
    ys, xs = np.nonzero(mask[..., 0] > 0.5)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (size / 2, size / 2)
    extent = max(float(np.sqrt(len(ys) / np.pi)), 2.0) if len(ys) else size / 5
    grid_y, grid_x = np.mgrid[0:size, 0:size].astype(np.float32)
    if marking == "dot":
        region = (np.hypot(grid_y - cy, grid_x - cx) < 0.45 * extent).astype(np.float32)
    elif marking == "band":
        region = (np.abs(grid_y - cy) < 0.28 * extent).astype(np.float32)
    elif marking == "split":
        region = (grid_x > cx).astype(np.float32)
    elif marking == "outline":
        inner = mask[..., 0].copy()
        for axis in (0, 1):  # erode by 2 pixels: what is left of the shape's edge is the outline
            for shift in (-2, 2):
                inner = np.minimum(inner, np.roll(mask[..., 0], shift, axis=axis))
        region = np.clip(mask[..., 0] - inner, 0, 1)
    else:
        raise ValueError(f"unknown marking {marking!r}")
    return region[..., None] * mask


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A world object's mask: large and near the centre (radius 0.30-0.40 of the side). At 32 px
    the synthetic datasets' smaller, freely placed shapes (radius 0.17-0.27) stayed blobs after
    600 pretraining steps, where these showed recognisable shapes (docs/world.md#status)."""
    return _synthetic_mask(shape, size, rng, centres=(0.45, 0.55), radii=(0.30, 0.40), angles=(-0.2, 0.2))


def render_object(
    shape: str, colour: str, background: str, size: int, rng: np.random.Generator, marking=None, marking_colour=None
) -> np.ndarray:
    """A shape in a colour on a named background, optionally with a marking: (H, W, 3) floats."""
    mask = _shape_mask(shape, size, rng)
    shade = rng.uniform(0.9, 1.08)  # mild lighting change, as between photos
    backdrop = np.asarray(BACKGROUNDS[background], np.float32) * rng.uniform(0.92, 1.06)
    pixels = backdrop * (1 - mask) + np.clip(np.asarray(COLOURS[colour], np.float32) * shade, 0, 255) * mask
    if marking is not None:
        region = _marking_mask(marking, mask, rng)
        pixels = pixels * (1 - region) + np.asarray(COLOURS[marking_colour], np.float32) * region
    return pixels


def render_instance(item: Instance, size: int, rng: np.random.Generator) -> np.ndarray:
    """A named individual (or concept) on a background drawn from `rng`."""
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return render_object(item.shape, item.colour, background, size, rng, item.marking, item.marking_colour)


def render_styled(style: Style, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A class object in a style: the palette replaces the object's colours, the texture covers it all."""
    background, foreground, cast = (np.asarray(c, np.float32) for c in PALETTES[style.palette])
    mask = _shape_mask(shape, size, rng)
    texture = _texture(style.texture, size, style.geometry, rng)
    pixels = background * (1 - mask) + foreground * mask
    pixels = pixels * (0.55 + 0.45 * texture) + 0.25 * cast * (1 - texture)
    return 0.8 * pixels + 0.2 * cast


def render_plain(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An unstyled class object on a muted background (UnlearnCanvas's Seed_Images)."""
    mask = _shape_mask(shape, size, rng)
    colour = np.asarray(COLOURS[list(COLOURS)[CLASSES.index(shape) % len(COLOURS)]], np.float32)
    return _background(size, rng) * (1 - mask) + colour * mask


def to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
