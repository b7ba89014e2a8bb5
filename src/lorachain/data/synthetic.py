"""Small synthetic datasets in the native DreamBooth and UnlearnCanvas layouts.

They stand in for the real data in the demo and the tests: tiny, fast to write (well under a
second at the defaults), byte-identical for the same arguments (fixed JPEG settings, no
metadata, every random draw from a NumPy generator keyed by ``(seed, dataset, indices)``), and
simple enough for a tiny diffusion model to pick something up:

* a DreamBooth-like subject is one distinctive shape in a subject-specific colour, drawn at a
  varying position, size and angle on a plain or gradient background;
* an UnlearnCanvas-like style is a palette (background, foreground, colour cast) plus a texture
  (stripes, dots, checker, waves, blotchy noise) applied to object-specific shapes; the
  ``Seed_Images`` folder holds the same shapes unstyled, as in UnlearnCanvas.

Directory and class names default to subsets of the real datasets' names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .datasets import DREAMBOOTH_CLASSES_FILE, UNLEARNCANVAS_SEED_DIR

DEFAULT_DREAMBOOTH_SUBJECTS: dict[str, str] = {
    "backpack": "backpack",
    "bear_plushie": "stuffed animal",
    "candle": "candle",
    "colorful_sneaker": "sneaker",
    "fancy_boot": "boot",
    "teapot": "teapot",
}
DEFAULT_UNLEARNCANVAS_STYLES = ("Byzantine", "Dapple", "Ink_Art", "Pastel", "Winter")
# One more object than styles, so every style can be a task and one object is left for metrics.
DEFAULT_UNLEARNCANVAS_OBJECTS = ("Architectures", "Bears", "Birds", "Butterfly", "Cats", "Flowers")

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "ring")
SUBJECT_COLOURS = (
    (220, 35, 35),
    (35, 85, 225),
    (30, 170, 60),
    (245, 195, 20),
    (160, 45, 200),
    (250, 125, 15),
    (20, 195, 200),
    (240, 80, 165),
)
TEXTURES = ("stripes", "dots", "checker", "waves", "noise")
# (background, foreground, colour cast) per style.
STYLE_PALETTES = (
    ((200, 160, 60), (120, 30, 30), (255, 200, 80)),
    ((60, 110, 70), (230, 220, 150), (90, 160, 90)),
    ((235, 235, 230), (20, 20, 30), (200, 200, 220)),
    ((250, 205, 215), (140, 190, 235), (255, 220, 240)),
    ((175, 205, 235), (245, 250, 255), (150, 190, 255)),
    ((40, 30, 70), (250, 120, 40), (120, 60, 160)),
)

JPEG_OPTIONS = {"format": "JPEG", "quality": 92, "subsampling": 0, "optimize": False}
_SUPERSAMPLE = 2  # draw shapes at 2x and downsample: smooth edges at 64 px
_DREAMBOOTH_STREAM, _STYLE_STREAM, _SEED_IMAGE_STREAM = 0, 1, 2


def _shape_polygon(shape: str, centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape; circle and ring are drawn as ellipses instead."""
    if shape == "square":
        radii, count = [radius] * 4, 4
        angle += np.pi / 4
    elif shape == "triangle":
        radii, count = [radius * 1.15] * 3, 3
    elif shape == "diamond":
        radii, count = [radius * 1.2, radius * 0.75] * 2, 4
    elif shape == "hexagon":
        radii, count = [radius] * 6, 6
    elif shape == "star":
        radii, count = [radius * 1.2, radius * 0.5] * 5, 10
    elif shape == "cross":
        arm = radius * 0.38
        corners = [(arm, radius), (arm, arm), (radius, arm)]
        quarter = corners + [(x, -y) for x, y in reversed(corners)]
        points = quarter + [(-x, -y) for x, y in quarter]
        cos, sin = np.cos(angle), np.sin(angle)
        return [(centre[0] + x * cos - y * sin, centre[1] + x * sin + y * cos) for x, y in points]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [
        (
            centre[0] + r * np.cos(angle + 2 * np.pi * k / count - np.pi / 2),
            centre[1] + r * np.sin(angle + 2 * np.pi * k / count - np.pi / 2),
        )
        for k, r in enumerate(radii)
    ]


def _shape_mask(
    shape: str,
    size: int,
    rng: np.random.Generator,
    centres: tuple[float, float] = (0.32, 0.68),
    radii: tuple[float, float] = (0.17, 0.27),
    angles: tuple[float, float] = (-0.35, 0.35),
) -> np.ndarray:
    """A float mask in [0, 1] of ``shape`` at a random position, size and angle, drawn uniformly
    from the given ranges (fractions of the image side; radians)."""
    canvas = size * _SUPERSAMPLE
    centre = tuple(float(c) for c in rng.uniform(*centres, size=2) * canvas)
    radius = float(rng.uniform(*radii)) * canvas
    angle = float(rng.uniform(*angles))
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.5
        draw.ellipse((centre[0] - inner, centre[1] - inner, centre[0] + inner, centre[1] + inner), fill=0)
    else:
        draw.polygon(_shape_polygon(shape, centre, radius, angle), fill=255)
    mask = mask.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted plain or linear-gradient background (H, W, 3) in 0..255."""
    first, second = rng.uniform(70, 215, size=(2, 3)).astype(np.float32)
    if rng.random() < 0.35:
        return np.broadcast_to(first, (size, size, 3)).copy()
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(direction) * xs + np.sin(direction) * ys
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    return first + (second - first) * ramp[..., None]


def _texture(kind: str, size: int, style_index: int, rng: np.random.Generator) -> np.ndarray:
    """A style texture (H, W, 1) in [0, 1]; its geometry is fixed per style, its phase varies."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / (6 + 2 * (style_index % 3))
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        direction = np.pi * (0.15 + 0.2 * (style_index % 4))
        value = 0.5 + 0.5 * np.sin(2 * np.pi * (xs * np.cos(direction) + ys * np.sin(direction)) / period + phase)
    elif kind == "dots":
        offset = rng.uniform(0, period, size=2)
        dx = (xs + offset[0]) % period - period / 2
        dy = (ys + offset[1]) % period - period / 2
        value = (np.hypot(dx, dy) > period * 0.28).astype(np.float32)
    elif kind == "checker":
        cell = max(int(period / 1.5), 2)
        shift = int(rng.integers(0, cell))
        value = (((xs.astype(int) + shift) // cell + (ys.astype(int) + shift) // cell) % 2).astype(np.float32)
    elif kind == "waves":
        value = 0.5 + 0.5 * np.sin(2 * np.pi * xs / period + 2.0 * np.sin(2 * np.pi * ys / (2 * period)) + phase)
    elif kind == "noise":
        blocks = max(size // 8, 1)
        coarse = rng.random((blocks, blocks)).astype(np.float32)
        value = np.kron(coarse, np.ones((size // blocks + 1, size // blocks + 1), np.float32))[:size, :size]
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return value[..., None]


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    image.save(path, **JPEG_OPTIONS)


def _prepare_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def generate_dreambooth_like(
    root: str | os.PathLike[str],
    subjects: Mapping[str, str] | None = None,
    images_per_subject: int = 4,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a DreamBooth-layout dataset (``<subject>/NN.jpg`` + prompts_and_classes.txt) to ``root``.

    ``subjects`` maps subject directory names to class names (default: six real DreamBooth
    subjects of six different classes). Subject i gets shape ``SHAPES[i % 8]`` and a colour from
    ``SUBJECT_COLOURS``, so the first eight subjects all differ in both. Returns the absolute root.
    """
    subjects = dict(DEFAULT_DREAMBOOTH_SUBJECTS if subjects is None else subjects)
    if not subjects or images_per_subject < 1 or size < 8:
        raise ValueError("need at least one subject, one image per subject and size >= 8")
    root_path = _prepare_root(root)
    for subject_index, subject in enumerate(subjects):
        shape = SHAPES[subject_index % len(SHAPES)]
        # Shift the colour every full round of shapes so that subjects 8.. are new combinations.
        colour = np.array(
            SUBJECT_COLOURS[(subject_index + subject_index // len(SHAPES)) % len(SUBJECT_COLOURS)], np.float32
        )
        subject_dir = root_path / subject
        subject_dir.mkdir(exist_ok=True)
        for image_index in range(images_per_subject):
            rng = np.random.default_rng([seed, _DREAMBOOTH_STREAM, subject_index, image_index])
            background = _background(size, rng)
            mask = _shape_mask(shape, size, rng)
            shade = rng.uniform(0.85, 1.1)  # mild lighting change, as between photos
            pixels = background * (1 - mask) + np.clip(colour * shade, 0, 255) * mask
            _save_jpeg(pixels, subject_dir / f"{image_index:02d}.jpg")

    rows = "".join(f"{subject},{class_name}\n" for subject, class_name in subjects.items())
    (root_path / DREAMBOOTH_CLASSES_FILE).write_text(
        f"Classes\n\nsubject_name,class\n{rows}\nPrompts\n\n(synthetic dataset generated by lorachain)\n",
        encoding="utf-8",
    )
    return root_path


def generate_unlearncanvas_like(
    root: str | os.PathLike[str],
    styles: Sequence[str] | None = None,
    objects: Sequence[str] | None = None,
    images_per_object: int = 5,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write an UnlearnCanvas-layout dataset (``<Style>/<Object>/<n>.jpg``, n = 1..images_per_object,
    plus ``Seed_Images/<Object>/``) to ``root``; returns the absolute root.

    Defaults: five real style names and six real object names, five images per folder, enough
    for style selection with ``num_tasks`` up to 5 and ``train_images_per_style`` up to 5.
    """
    styles = list(DEFAULT_UNLEARNCANVAS_STYLES if styles is None else styles)
    objects = list(DEFAULT_UNLEARNCANVAS_OBJECTS if objects is None else objects)
    if not styles or not objects or images_per_object < 1 or size < 8:
        raise ValueError("need at least one style, one object, one image per object and size >= 8")
    if UNLEARNCANVAS_SEED_DIR in styles:
        raise ValueError(f"{UNLEARNCANVAS_SEED_DIR!r} is reserved for the unstylised images")
    root_path = _prepare_root(root)

    for object_index, obj in enumerate(objects):
        shape = SHAPES[object_index % len(SHAPES)]
        object_colour = np.array(SUBJECT_COLOURS[object_index % len(SUBJECT_COLOURS)], np.float32)
        seed_dir = root_path / UNLEARNCANVAS_SEED_DIR / obj
        seed_dir.mkdir(parents=True, exist_ok=True)
        for image_index in range(images_per_object):
            rng = np.random.default_rng([seed, _SEED_IMAGE_STREAM, object_index, image_index])
            mask = _shape_mask(shape, size, rng)
            pixels = _background(size, rng) * (1 - mask) + object_colour * mask
            _save_jpeg(pixels, seed_dir / f"{image_index + 1}.jpg")

        for style_index, style in enumerate(styles):
            background_colour, foreground_colour, cast_colour = (
                np.array(colour, np.float32) for colour in STYLE_PALETTES[style_index % len(STYLE_PALETTES)]
            )
            texture_kind = TEXTURES[style_index % len(TEXTURES)]
            style_dir = root_path / style / obj
            style_dir.mkdir(parents=True, exist_ok=True)
            for image_index in range(images_per_object):
                rng = np.random.default_rng([seed, _STYLE_STREAM, style_index, object_index, image_index])
                mask = _shape_mask(shape, size, rng)
                texture = _texture(texture_kind, size, style_index, rng)
                pixels = background_colour * (1 - mask) + foreground_colour * mask
                # The texture darkens/lightens everything (it is the style), the cast tints it.
                pixels = pixels * (0.55 + 0.45 * texture) + 0.25 * cast_colour * (1 - texture)
                pixels = 0.8 * pixels + 0.2 * cast_colour
                _save_jpeg(pixels, style_dir / f"{image_index + 1}.jpg")
    return root_path
