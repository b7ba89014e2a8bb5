"""Tests of lorachain.data: readers, validation, reference selections, task files, synthetic data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lorachain.data import (
    OBJECT_EVAL_TEMPLATES,
    OBJECT_TOKENS,
    STYLE_EVAL_TEMPLATES,
    DatasetError,
    Task,
    generate_dreambooth_like,
    generate_unlearncanvas_like,
    order_tasks,
    read_dreambooth,
    read_task_meta,
    read_tasks,
    read_unlearncanvas,
    select_object_tasks,
    select_style_tasks,
    write_tasks,
)

# The real dataset lives in ../shared beside the checkout (never copied into the repository);
# LORACHAIN_DREAMBOOTH points elsewhere. Tests that need it skip only when it is absent.
REAL_DREAMBOOTH = Path(
    os.environ.get("LORACHAIN_DREAMBOOTH", Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambooth")
)

# The 60 style directories and 20 object classes of UnlearnCanvas (docs/protocol.md#selection-styles).
UNLEARNCANVAS_STYLES = """
Abstractionism Artist_Sketch Blossom_Season Blue_Blooming Bricks Byzantine Cartoon Cold_Warm
Color_Fantasy Comic_Etch Crayon Crypto_Punks Cubism Dadaism Dapple Defoliation Dreamweave
Early_Autumn Expressionism Fauvism Foliage_Patchwork French Glowing_Sunset Gorgeous_Love Greenfield
Impasto Impressionism Ink_Art Joy Liquid_Dreams Palette_Knife Magic_Cube Meta_Physics Meteor_Shower
Monet Mosaic Neon_Lines On_Fire Pastel Pencil_Drawing Picasso Pointillism Pop_Art Rainwash
Realistic_Watercolor Red_Blue_Ink Rust Sketch Sponge_Dabbed Structuralism Superstring Surrealism
Techno Ukiyoe Van_Gogh Vibrant_Flow Warm_Love Warm_Smear Watercolor Winter
""".split()
UNLEARNCANVAS_OBJECTS = """
Architectures Bears Birds Butterfly Cats Dogs Fishes Flame Flowers Frogs Horses Human Jellyfish
Rabbits Sandwiches Sea Statues Towers Trees Waterfalls
""".split()


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def unlearncanvas_names_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full UnlearnCanvas layout (60 styles x 20 objects x 1..20.jpg + Seed_Images), tiny images."""
    root = tmp_path_factory.mktemp("unlearncanvas")
    jpeg = _tiny_jpeg()
    for style in [*UNLEARNCANVAS_STYLES, "Seed_Images"]:
        for obj in UNLEARNCANVAS_OBJECTS:
            folder = root / style / obj
            folder.mkdir(parents=True)
            for index in range(1, 21):
                (folder / f"{index}.jpg").write_bytes(jpeg)
    return root


@pytest.fixture()
def dreambooth_copy(tmp_path: Path) -> Path:
    return generate_dreambooth_like(tmp_path / "dreambooth", images_per_subject=2, size=16)


@pytest.fixture()
def unlearncanvas_copy(tmp_path: Path) -> Path:
    return generate_unlearncanvas_like(tmp_path / "unlearncanvas", size=16)


# --------------------------------------------------------------------------- reference selections


@pytest.mark.skipif(not REAL_DREAMBOOTH.is_dir(), reason="real DreamBooth copy not present")
def test_object_selection_reproduces_reference_table() -> None:
    tasks = select_object_tasks(REAL_DREAMBOOTH)
    expected = [
        ("sks", "sneaker", "colorful_sneaker"),
        ("zwz", "boot", "fancy_boot"),
        ("sbu", "backpack", "backpack"),
        ("uwu", "stuffed animal", "bear_plushie"),
        ("pdw", "candle", "candle"),
        ("twt", "can", "can"),
        ("zsn", "glasses", "pink_sunglasses"),
        ("ofl", "bowl", "berry_bowl"),
        ("psq", "cartoon", "red_cartoon"),
        ("cws", "teapot", "teapot"),
    ]
    assert [(t.token, t.class_name, t.concept) for t in tasks] == expected
    sneaker = tasks[0]
    assert sneaker.kind == "object"
    assert sneaker.train_prompt == "a photo of sks sneaker"
    assert sneaker.eval_prompts == tuple(template.format("sks sneaker") for template in OBJECT_EVAL_TEMPLATES)
    assert sneaker.eval_prompts[0] == "a sks sneaker in a purple wizard outfit"
    subject_dir = (REAL_DREAMBOOTH / "colorful_sneaker").absolute()
    assert sneaker.train_images == tuple(sorted(str(p) for p in subject_dir.glob("*.jpg")))
    assert sneaker.reference_images == sneaker.train_images
    assert all(Path(p).is_absolute() for t in tasks for p in t.train_images)


@pytest.mark.skipif(not REAL_DREAMBOOTH.is_dir(), reason="real DreamBooth copy not present")
def test_read_real_dreambooth() -> None:
    subjects = read_dreambooth(REAL_DREAMBOOTH)
    assert len(subjects) == 30
    assert subjects["bear_plushie"]["class"] == "stuffed animal"
    assert sum(len(s["images"]) for s in subjects.values()) == 158


def test_style_selection_reproduces_reference_table(unlearncanvas_names_copy: Path) -> None:
    root = unlearncanvas_names_copy
    tasks = select_style_tasks(root)
    assert [(t.concept, t.class_name) for t in tasks] == [
        ("Byzantine", "Butterfly"),
        ("Palette_Knife", "Architectures"),
        ("Ink_Art", "Flowers"),
        ("Blossom_Season", "Flame"),
        ("Artist_Sketch", "Statues"),
        ("Winter", "Birds"),
        ("Dadaism", "Human"),
        ("Dapple", "Bears"),
        ("Meteor_Shower", "Horses"),
        ("Pastel", "Towers"),
    ]
    metric = [(Path(p).parent.name, int(Path(p).stem)) for p in tasks[0].reference_images]
    assert metric == list(
        zip(
            ["Cats", "Dogs", "Fishes", "Frogs", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Trees", "Waterfalls"],
            [1, 4, 13, 11, 5, 12, 17, 1, 17, 14],
        )
    )
    for task in tasks:  # the same metric objects and indices in every style
        assert [(Path(p).parent.name, int(Path(p).stem)) for p in task.reference_images] == metric
        assert all(Path(p).parent.parent.name == task.concept for p in task.reference_images)
        assert len(task.train_images) == 5
        assert all(Path(p).parent == root.absolute() / task.concept / task.class_name for p in task.train_images)
        assert task.token is None and task.kind == "style"
    # The reference's random.sample over the lexicographic listing (1.jpg, 10.jpg, 11.jpg, ...).
    assert [int(Path(p).stem) for p in tasks[0].train_images] == [9, 13, 15, 17, 19]
    assert [int(Path(p).stem) for p in tasks[1].train_images] == [2, 9, 11, 12, 20]
    palette = tasks[1]
    assert palette.train_prompt == "palette knife image of architectures"
    assert tasks[0].train_prompt == "byzantine image of butterfly"
    assert palette.eval_prompts == tuple(template.format("palette knife") for template in STYLE_EVAL_TEMPLATES)


def test_read_unlearncanvas_ignores_seed_images_and_sorts_numerically(unlearncanvas_names_copy: Path) -> None:
    styles = read_unlearncanvas(unlearncanvas_names_copy)
    assert len(styles) == 60 and "Seed_Images" not in styles
    images = styles["Byzantine"]["Cats"]
    assert [Path(p).name for p in images[:3]] == ["1.jpg", "2.jpg", "3.jpg"]
    assert Path(images[-1]).name == "20.jpg"


# --------------------------------------------------------------------------- orders, explicit lists


def test_order_tasks_matches_global_random_shuffle(dreambooth_copy: Path) -> None:
    tasks = select_object_tasks(dreambooth_copy, num_tasks=6)
    state = random.getstate()
    try:
        for order_seed in (0, 5, 10, 42):
            expected = list(tasks)
            random.seed(order_seed)
            random.shuffle(expected)
            assert order_tasks(tasks, order_seed) == expected
    finally:
        random.setstate(state)
    original = list(tasks)
    order_tasks(tasks, 0)
    assert tasks == original  # a copy is shuffled, not the input


def test_explicit_subjects_and_styles_override_selection(dreambooth_copy: Path, unlearncanvas_copy: Path) -> None:
    tasks = select_object_tasks(dreambooth_copy, subjects=["teapot", "candle"])
    assert [(t.concept, t.token, t.class_name) for t in tasks] == [
        ("teapot", "sks", "teapot"),
        ("candle", "zwz", "candle"),
    ]
    styles = select_style_tasks(unlearncanvas_copy, styles=["Pastel", "Winter"], train_images_per_style=2)
    assert [t.concept for t in styles] == ["Pastel", "Winter"]
    assert len(styles[0].reference_images) == 4  # 6 objects - 2 training objects


def test_unknown_explicit_names_are_reported(dreambooth_copy: Path, unlearncanvas_copy: Path) -> None:
    with pytest.raises(DatasetError, match=r"'dragon'.*dreambooth.*available subjects: backpack"):
        select_object_tasks(dreambooth_copy, subjects=["teapot", "dragon"])
    with pytest.raises(DatasetError, match=r"'Cubism'.*unlearncanvas.*available styles: Byzantine"):
        select_style_tasks(unlearncanvas_copy, styles=["Cubism"])


def test_selection_is_deterministic_and_seed_dependent(unlearncanvas_copy: Path) -> None:
    first = select_style_tasks(unlearncanvas_copy, num_tasks=4, train_images_per_style=3)
    assert first == select_style_tasks(unlearncanvas_copy, num_tasks=4, train_images_per_style=3)
    others = [
        select_style_tasks(unlearncanvas_copy, num_tasks=4, seed=seed, train_images_per_style=3) for seed in range(5)
    ]
    assert any(other != first for other in others)


# --------------------------------------------------------------------------- too few items


def test_too_many_tasks_are_rejected(dreambooth_copy: Path, unlearncanvas_copy: Path) -> None:
    with pytest.raises(DatasetError, match=r"has 6 object classes but num_tasks is 7.*lower num_tasks"):
        select_object_tasks(dreambooth_copy, num_tasks=7)
    with pytest.raises(DatasetError, match=r"has 5 styles but num_tasks is 6.*lower num_tasks"):
        select_style_tasks(unlearncanvas_copy, num_tasks=6)
    with pytest.raises(DatasetError, match=r"need 3 rare tokens but only 2"):
        select_object_tasks(dreambooth_copy, num_tasks=3, tokens=("sks", "zwz"))
    with pytest.raises(DatasetError, match=r"has 5 images but train_images_per_style is 6"):
        select_style_tasks(unlearncanvas_copy, num_tasks=2, train_images_per_style=6)


def test_style_selection_needs_a_metric_object(tmp_path: Path) -> None:
    root = generate_unlearncanvas_like(
        tmp_path / "uc", styles=["Joy", "Rust", "Techno"], objects=["Bears", "Cats"], size=16
    )
    with pytest.raises(DatasetError, match=r"2 object classes.*at least one held-out metric object.*at most 1"):
        select_style_tasks(root, num_tasks=2)
    (task,) = select_style_tasks(root, num_tasks=1)
    assert len(task.reference_images) == 1


# --------------------------------------------------------------------------- bad input


def test_missing_roots(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=rf"{re.escape(str(missing))}.*does not exist"):
        read_dreambooth(missing)
    with pytest.raises(DatasetError, match=rf"{re.escape(str(missing))}.*does not exist"):
        select_style_tasks(missing)


def test_dreambooth_root_without_classes_file(dreambooth_copy: Path) -> None:
    (dreambooth_copy / "prompts_and_classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"prompts_and_classes.txt is missing"):
        select_object_tasks(dreambooth_copy, num_tasks=2)


def test_dreambooth_malformed_classes_file(dreambooth_copy: Path) -> None:
    classes_file = dreambooth_copy / "prompts_and_classes.txt"
    classes_file.write_text("Classes\n\nsubject_name,class\nteapot\n")
    message = rf"{re.escape(str(classes_file))} line 4: 'teapot' is not a 'subject,class' row"
    with pytest.raises(DatasetError, match=message):
        read_dreambooth(dreambooth_copy)
    classes_file.write_text("just some text\n")
    with pytest.raises(DatasetError, match=r"has no 'Classes' section"):
        read_dreambooth(dreambooth_copy)


def test_dreambooth_subject_without_directory(dreambooth_copy: Path) -> None:
    classes_file = dreambooth_copy / "prompts_and_classes.txt"
    classes_file.write_text(classes_file.read_text().replace("teapot,teapot\n", "teapot,teapot\nvase,vase\n"))
    message = rf"'vase' is listed in .*but its directory {re.escape(str(dreambooth_copy / 'vase'))} is missing"
    with pytest.raises(DatasetError, match=message):
        read_dreambooth(dreambooth_copy)


def test_dreambooth_subject_without_images(dreambooth_copy: Path) -> None:
    for image in (dreambooth_copy / "candle").iterdir():
        image.unlink()
    (dreambooth_copy / "candle" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(dreambooth_copy / 'candle'))} contains no images"):
        read_dreambooth(dreambooth_copy)


def test_dreambooth_undecodable_image(dreambooth_copy: Path) -> None:
    broken = dreambooth_copy / "teapot" / "00.jpg"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated JPEG
    with pytest.raises(DatasetError, match=rf"{re.escape(str(broken))} cannot be decoded"):
        select_object_tasks(dreambooth_copy, subjects=["candle", "teapot"])
    # Images outside the selection are not decoded (the check stays cheap).
    assert len(select_object_tasks(dreambooth_copy, subjects=["candle"])) == 1


def test_unlearncanvas_root_without_styles(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    (root / "Seed_Images" / "Cats").mkdir(parents=True)
    (root / "Byzantine").mkdir()
    (root / "Byzantine" / "1.jpg").write_bytes(_tiny_jpeg())
    with pytest.raises(DatasetError, match=rf"{re.escape(str(root))} is not an UnlearnCanvas dataset"):
        read_unlearncanvas(root)


def test_unlearncanvas_object_without_images(unlearncanvas_copy: Path) -> None:
    empty = unlearncanvas_copy / "Pastel" / "Cats"
    for image in empty.iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match=rf"{re.escape(str(empty))} contains no images"):
        select_style_tasks(unlearncanvas_copy, num_tasks=2)


def test_unlearncanvas_missing_object_directory(unlearncanvas_copy: Path) -> None:
    for image in (unlearncanvas_copy / "Winter" / "Bears").iterdir():
        image.unlink()
    (unlearncanvas_copy / "Winter" / "Bears").rmdir()
    message = rf"{re.escape(str(unlearncanvas_copy / 'Winter'))} has no object directory 'Bears'"
    with pytest.raises(DatasetError, match=message):
        select_style_tasks(unlearncanvas_copy, styles=["Winter"], seed=0)


def test_unlearncanvas_undecodable_selected_image(unlearncanvas_copy: Path) -> None:
    (task,) = select_style_tasks(unlearncanvas_copy, styles=["Dapple"], train_images_per_style=2)
    broken = Path(task.reference_images[0])
    broken.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(broken))} cannot be decoded"):
        select_style_tasks(unlearncanvas_copy, styles=["Dapple"], train_images_per_style=2)


# --------------------------------------------------------------------------- task files


def test_task_file_round_trip(tmp_path: Path, dreambooth_copy: Path, unlearncanvas_copy: Path) -> None:
    tasks = select_object_tasks(dreambooth_copy, num_tasks=3) + select_style_tasks(unlearncanvas_copy, num_tasks=2)
    path = tmp_path / "out" / "tasks.json"
    write_tasks(path, tasks, domain="mixed", order_seed=5)
    assert read_tasks(path) == tasks
    assert read_task_meta(path) == {"domain": "mixed", "order_seed": 5}
    content = json.loads(path.read_text())
    assert list(content) == ["tasks", "domain", "order_seed"]
    assert content["tasks"][0]["token"] == "sks" and content["tasks"][-1]["token"] is None
    assert "\n  " in path.read_text()  # indented, human-readable
    assert [p.name for p in path.parent.iterdir()] == ["tasks.json"]  # no temp file left behind
    assert Task.from_dict(tasks[0].to_dict()) == tasks[0]


def test_task_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "tasks.json"
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))} does not exist"):
        read_tasks(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(path))} is not valid JSON"):
        read_tasks(path)
    path.write_text(json.dumps({"tasks": [{"concept": "x", "kind": "object"}]}))
    with pytest.raises(DatasetError, match=r"missing: \['class_name'"):
        read_tasks(path)
    with pytest.raises(TypeError):
        write_tasks(path, [], tasks=[])


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_generation_is_deterministic(tmp_path: Path) -> None:
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        dreambooth = generate_dreambooth_like(tmp_path / name / "dreambooth", seed=seed)
        unlearncanvas = generate_unlearncanvas_like(tmp_path / name / "unlearncanvas", seed=seed)
        digests.append((_tree_digest(dreambooth), _tree_digest(unlearncanvas)))
    assert digests[0] == digests[1]
    assert digests[0][0] != digests[2][0] and digests[0][1] != digests[2][1]


def test_synthetic_datasets_match_the_native_layouts(tmp_path: Path) -> None:
    dreambooth = generate_dreambooth_like(tmp_path / "dreambooth")
    subjects = read_dreambooth(dreambooth)
    assert len(subjects) == 6 and all(len(s["images"]) == 4 for s in subjects.values())
    with Image.open(subjects["teapot"]["images"][0]) as image:
        assert image.size == (64, 64) and image.format == "JPEG"
    unlearncanvas = generate_unlearncanvas_like(tmp_path / "unlearncanvas")
    styles = read_unlearncanvas(unlearncanvas)
    assert len(styles) == 5 and all(len(objects) == 6 for objects in styles.values())
    assert (unlearncanvas / "Seed_Images" / "Cats" / "1.jpg").is_file()
    tasks = select_style_tasks(unlearncanvas, num_tasks=5)
    assert {t.concept for t in tasks} == set(styles) and all(len(t.reference_images) == 1 for t in tasks)


def test_custom_synthetic_subjects(tmp_path: Path) -> None:
    root = generate_dreambooth_like(
        tmp_path / "db", subjects={"dog": "dog", "dog2": "dog", "cat": "cat"}, images_per_subject=1, size=16
    )
    subjects = read_dreambooth(root)
    assert {name: info["class"] for name, info in subjects.items()} == {"cat": "cat", "dog": "dog", "dog2": "dog"}
    tasks = select_object_tasks(root, num_tasks=2)
    assert sorted(t.class_name for t in tasks) == ["cat", "dog"]


def test_data_package_does_not_import_torch() -> None:
    import lorachain

    source_dir = str(Path(lorachain.__file__).resolve().parents[1])
    code = "import sys, lorachain.data; assert 'torch' not in sys.modules, 'torch imported'"
    environment = {**os.environ, "PYTHONPATH": source_dir}
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)


def test_constants() -> None:
    assert OBJECT_TOKENS == ("sks", "zwz", "sbu", "uwu", "pdw", "twt", "zsn", "ofl", "psq", "cws")
    assert len(OBJECT_EVAL_TEMPLATES) == len(STYLE_EVAL_TEMPLATES) == 5
