"""Readers and validation for the two personalisation datasets, in their native layouts.

* DreamBooth (objects): ``<root>/<subject>/*.jpg`` plus ``<root>/prompts_and_classes.txt``, whose
  "Classes" section lists ``subject_name,class`` rows (the file of google/dreambooth).
* UnlearnCanvas (styles): ``<root>/<Style>/<Object>/<n>.jpg`` plus ``<root>/Seed_Images/``
  (unstylised photos, ignored here).

Every problem with the input raises one :class:`DatasetError` whose message names the offending
file or directory and says how to fix it, so that a workflow fails before any training starts.
Listing is cheap and done eagerly; decoding is done only for the images a selection actually
uses (:func:`check_images_decode`), so validating a 24 000-image UnlearnCanvas copy stays fast.

This module must stay free of torch: light-weight workflow steps import it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
DREAMBOOTH_CLASSES_FILE = "prompts_and_classes.txt"
UNLEARNCANVAS_SEED_DIR = "Seed_Images"


class DatasetError(ValueError):
    """A dataset directory, file or selection request that cannot be used (message says why)."""


def image_sort_key(path: str | os.PathLike[str]) -> tuple[int, int, str]:
    """Numeric stems in numeric order (``2.jpg`` before ``10.jpg``), then other names by name."""
    name = Path(path).name
    stem = Path(path).stem
    if stem.isdigit():
        return (0, int(stem), name)
    return (1, 0, name)


def list_images(directory: Path) -> list[str]:
    """Absolute paths of the image files directly in ``directory``, in :func:`image_sort_key` order."""
    paths = [
        str(entry)
        for entry in directory.iterdir()
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith(".")
    ]
    return sorted(paths, key=image_sort_key)


def _subdirectories(directory: Path) -> list[Path]:
    """Sorted visible sub-directories (hidden ones such as ``.ipynb_checkpoints`` are skipped)."""
    return sorted(
        (entry for entry in directory.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )


def _existing_root(root: str | os.PathLike[str], dataset: str, fix: str) -> Path:
    # absolute() rather than resolve(): keep the user's path (a symlinked data dir stays as given).
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DatasetError(f"{dataset} dataset directory {path} does not exist; {fix}")
    if not path.is_dir():
        raise DatasetError(f"{dataset} dataset root {path} is not a directory; {fix}")
    return path


def check_images_decode(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Fully decode every image in ``paths``; raise DatasetError naming the first broken file.

    ``Image.verify()`` alone misses truncated JPEG data, so the pixels are loaded. Callers pass
    only the images a selection uses (a few dozen), which keeps this cheap.
    """
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three on bad files
            raise DatasetError(f"image {path} cannot be decoded ({error}); replace or delete the file") from error


def _parse_classes_section(classes_file: Path) -> dict[str, str]:
    """``subject -> class`` from the "Classes" section of DreamBooth's prompts_and_classes.txt.

    The section is a line ``Classes``, optional blank lines, the header ``subject_name,class`` and
    one ``subject,class`` row per subject up to the next blank line (then the "Prompts" section).
    """
    lines = classes_file.read_text(encoding="utf-8").splitlines()
    fix = "it must contain a 'Classes' line followed by 'subject_name,class' and one 'subject,class' row per subject"
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == "classes")
    except StopIteration:
        raise DatasetError(f"{classes_file} has no 'Classes' section; {fix}") from None

    index = start + 1
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index >= len(lines) or lines[index].strip().replace(" ", "").lower() != "subject_name,class":
        raise DatasetError(
            f"{classes_file} line {index + 1}: expected the header 'subject_name,class' after 'Classes'; {fix}"
        )

    subject_classes: dict[str, str] = {}
    for line_number in range(index + 2, len(lines) + 1):
        line = lines[line_number - 1].strip()
        if not line:
            break
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 2 or not all(fields):
            raise DatasetError(f"{classes_file} line {line_number}: {line!r} is not a 'subject,class' row; {fix}")
        subject, class_name = fields
        if subject in subject_classes:
            raise DatasetError(f"{classes_file} line {line_number}: subject {subject!r} is listed twice")
        subject_classes[subject] = class_name
    if not subject_classes:
        raise DatasetError(f"{classes_file} lists no subjects in its 'Classes' section; {fix}")
    return subject_classes


def read_dreambooth(root: str | os.PathLike[str], config_key: str = "the dataset root") -> dict[str, dict]:
    """Read a DreamBooth-layout directory: ``{subject: {"class": str, "images": [abs paths]}}``.

    Subjects come from the "Classes" section of ``prompts_and_classes.txt`` (sorted by name);
    directories not listed there are ignored. Each listed subject must have a directory with at
    least one image. Images are not decoded here (see :func:`check_images_decode`).
    """
    fix = f"point {config_key} at a copy of google/dreambooth's dataset/ directory"
    root_path = _existing_root(root, "DreamBooth", fix)
    classes_file = root_path / DREAMBOOTH_CLASSES_FILE
    if not classes_file.is_file():
        raise DatasetError(
            f"{root_path} is not a DreamBooth dataset: {classes_file} is missing; {fix} "
            f"(it holds <subject>/ image directories and {DREAMBOOTH_CLASSES_FILE})"
        )

    subjects: dict[str, dict] = {}
    for subject, class_name in sorted(_parse_classes_section(classes_file).items()):
        subject_dir = root_path / subject
        if not subject_dir.is_dir():
            raise DatasetError(
                f"subject {subject!r} is listed in {classes_file} but its directory {subject_dir} "
                f"is missing; add the directory or remove the row"
            )
        images = list_images(subject_dir)
        if not images:
            raise DatasetError(
                f"subject directory {subject_dir} contains no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add its images or remove the row from {classes_file}"
            )
        subjects[subject] = {"class": class_name, "images": images}
    return subjects


def read_unlearncanvas(
    root: str | os.PathLike[str], config_key: str = "the dataset root"
) -> dict[str, dict[str, list[str]]]:
    """Read an UnlearnCanvas-layout directory: ``{style: {object: [abs image paths]}}``.

    A style is a top-level directory holding object directories; ``Seed_Images`` and directories
    without sub-directories are not styles. Images are sorted by numeric stem (``1.jpg`` ..
    ``20.jpg``). Every object directory must contain an image. Images are not decoded here.
    """
    fix = f"point {config_key} at a local copy of UnlearnCanvas (<Style>/<Object>/<n>.jpg)"
    root_path = _existing_root(root, "UnlearnCanvas", fix)

    styles: dict[str, dict[str, list[str]]] = {}
    for style_dir in _subdirectories(root_path):
        if style_dir.name == UNLEARNCANVAS_SEED_DIR:
            continue
        object_dirs = _subdirectories(style_dir)
        if not object_dirs:
            continue
        objects: dict[str, list[str]] = {}
        for object_dir in object_dirs:
            images = list_images(object_dir)
            if not images:
                raise DatasetError(
                    f"object directory {object_dir} contains no images "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}); restore its images or delete the directory"
                )
            objects[object_dir.name] = images
        styles[style_dir.name] = objects

    if not styles:
        raise DatasetError(
            f"{root_path} is not an UnlearnCanvas dataset: no style directory containing object "
            f"directories was found (expected <Style>/<Object>/<n>.jpg); {fix}"
        )
    return styles
