"""Task selection, task orders, prompts and the task-list file.

The selections reproduce the reference preprocessing scripts of "Low-Rank Continual
Personalization of Diffusion Models" (luk-st/continual-lora, ``preprocess/generate_object_dataset.py``
and ``preprocess/generate_style_dataset.py``) call for call. ``random.Random(seed)`` is used
instead of ``random.seed(seed)`` on the module-level generator: it yields the same sequence without
touching global state.

Objects (DreamBooth), :func:`select_object_tasks`::

    rng = random.Random(42)
    classes = rng.sample(sorted(set_of_classes), num_tasks)
    subject_of = {c: rng.choice(sorted(subjects_of_class[c])) for c in classes}  # in that order
    tokens assigned in selection order: sks zwz sbu uwu pdw twt zsn ofl psq cws

On the real 30-subject dataset this gives sks sneaker (colorful_sneaker), zwz boot (fancy_boot),
sbu backpack (backpack), uwu stuffed animal (bear_plushie), pdw candle (candle), twt can (can),
zsn glasses (pink_sunglasses), ofl bowl (berry_bowl), psq cartoon (red_cartoon), cws teapot
(teapot) -- exactly the reference table (the per-class subject lists are sorted by name, as the
reference's hard-coded class dictionary is).

Styles (UnlearnCanvas), :func:`select_style_tasks`::

    rng = random.Random(42)
    train_objects = rng.sample(sorted(objects), num_tasks)          # one per style, in order
    metric_objects = [o for o in sorted(objects) if o not in train_objects]
    styles = rng.sample(sorted(style_dirs), num_tasks)              # Seed_Images excluded
    metric_indices = rng.choices(range(1, 21), k=len(metric_objects))   # shared by all styles
    for style, train_object in zip(styles, train_objects):
        train = rng.sample(sorted(os.listdir(style/train_object)), 5)   # lexicographic listing
        references = [style/obj/f"{i}.jpg" for obj, i in zip(metric_objects, metric_indices)]

Over the 60 style and 20 object names of UnlearnCanvas this reproduces the whole reference table:
Byzantine: Butterfly, Palette_Knife: Architectures, Ink_Art: Flowers, Blossom_Season: Flame,
Artist_Sketch: Statues, Winter: Birds, Dadaism: Human, Dapple: Bears, Meteor_Shower: Horses,
Pastel: Towers; metric objects Cats Dogs Fishes Frogs Jellyfish Rabbits Sandwiches Sea Trees
Waterfalls with image indices 1 4 13 11 5 12 17 1 17 14. The five training images are the
reference's seeded sample (drawn from the lexicographically sorted file names, "1.jpg", "10.jpg",
"11.jpg", ...), e.g. Byzantine/Butterfly: 9 13 15 17 19.

Generalisations for datasets smaller than UnlearnCanvas (identical on the real one):

* metric objects are *all* objects not used for training (10 of 20 in the reference), so a
  dataset needs at least ``num_tasks + 1`` object classes;
* metric image indices are drawn from ``1..n`` with n the smallest image count among the metric
  object directories of the selected styles (20 on the real data), and index i means the i-th
  image in numeric-stem order (= ``{i}.jpg`` for UnlearnCanvas's 1.jpg..20.jpg names).

Prompts: objects train on ``"a photo of {token} {class}"``; styles on
``"{style phrase} image of {object phrase}"`` where a phrase is the directory name lower-cased
with underscores replaced by spaces (``Palette_Knife``/``Architectures`` ->
``"palette knife image of architectures"``), which is the reference's rule. Evaluation prompts
fill the five templates with ``"{token} {class}"`` or the style phrase.

Explicit ``subjects=`` / ``styles=`` lists replace only the random choice of subjects / styles;
the list defines the tasks and their order, and ``num_tasks`` is then not used. For styles, the
training and metric objects and all images are still drawn with the seed, as above (without the
style ``sample`` call).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .datasets import (
    DatasetError,
    check_images_decode,
    image_sort_key,
    read_dreambooth,
    read_unlearncanvas,
)

OBJECT_TOKENS = ("sks", "zwz", "sbu", "uwu", "pdw", "twt", "zsn", "ofl", "psq", "cws")
OBJECT_EVAL_TEMPLATES = (
    "a {} in a purple wizard outfit",
    "a {} in a police outfit",
    "a {} wearing a santa hat",
    "a {} in a jail",
    "a {} looking into a mirror",
)
STYLE_EVAL_TEMPLATES = (
    "{} image of a wizard",
    "{} image of a policeman",
    "{} image of a santa hat",
    "{} image of a clock",
    "{} image of a mirror",
)
# The modular regime's defaults: BlockLoRA tests "each concept using 20 prompts" without listing
# them. For objects these are the first 20 of DreamBooth's published object prompts (Ruiz et al.
# 2023, its dataset's prompts_and_classes.txt: the recontextualisations; the last five, property
# changes such as "a cube shaped", are left out); for styles, the style on each of UnlearnCanvas's
# 20 object classes.
BLOCKLORA_OBJECT_TEMPLATES = tuple(
    f"a {{}} {context}"
    for context in (
        "in the jungle",
        "in the snow",
        "on the beach",
        "on a cobblestone street",
        "on top of pink fabric",
        "on top of a wooden floor",
        "with a city in the background",
        "with a mountain in the background",
        "with a blue house in the background",
        "on top of a purple rug in a forest",
        "with a wheat field in the background",
        "with a tree and autumn leaves in the background",
        "with the Eiffel Tower in the background",
        "floating on top of water",
        "floating in an ocean of milk",
        "on top of green grass with sunflowers around it",
        "on top of a mirror",
        "on top of the sidewalk in a crowded street",
        "on top of a dirt road",
        "on top of a white rug",
    )
)
BLOCKLORA_STYLE_TEMPLATES = tuple(
    f"{{}} image of {subject}"
    for subject in (
        "architectures", "bears", "birds", "a butterfly", "cats", "dogs", "fishes", "a flame", "flowers", "frogs",
        "horses", "a human", "jellyfish", "rabbits", "sandwiches", "the sea", "statues", "towers", "trees",
        "waterfalls",
    )
)  # fmt: skip
OBJECT_TRAIN_TEMPLATE = "a photo of {}"
STYLE_TRAIN_TEMPLATE = "{} image of {}"
TASK_KINDS = ("object", "style")


@dataclass(frozen=True)
class Task:
    """One personalisation task: a concept, its training data, prompts and metric references."""

    concept: str  # DreamBooth subject dir ("colorful_sneaker") or UnlearnCanvas style dir ("Byzantine")
    kind: str  # "object" or "style"
    token: str | None  # rare token of an object ("sks"); None for styles
    class_name: str  # object class ("sneaker"), or the training object dir of a style ("Butterfly")
    train_images: tuple[str, ...]  # absolute paths, sorted
    train_prompt: str
    eval_prompts: tuple[str, ...]
    reference_images: tuple[str, ...]  # absolute paths the image metrics compare against

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise DatasetError(f"task {self.concept!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        # Accept lists (e.g. from JSON) but store tuples so a Task stays hashable and immutable.
        for name in ("train_images", "eval_prompts", "reference_images"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "concept": self.concept,
            "kind": self.kind,
            "token": self.token,
            "class_name": self.class_name,
            "train_images": list(self.train_images),
            "train_prompt": self.train_prompt,
            "eval_prompts": list(self.eval_prompts),
            "reference_images": list(self.reference_images),
        }

    @property
    def identifier(self) -> str:
        """What a prompt template's {} becomes: "sks sneaker", or the style phrase."""
        return f"{self.token} {self.class_name}" if self.token is not None else concept_phrase(self.concept)

    def with_templates(self, templates: Sequence[str]) -> Task:
        """The task with its evaluation prompts made from other templates (each holds {} once)."""
        return replace(self, eval_prompts=tuple(template.format(self.identifier) for template in templates))

    def plain_prompt(self, prompt: str) -> str:
        """The prompt as CLIPScore reads it: the concept's class word in place of its rare token
        ("a sks sneaker in a jail" -> "a sneaker in a jail"); a style's prompts have no rare token."""
        if self.token is None:
            return prompt
        return prompt.replace(f"{self.token} {self.class_name}", self.class_name)

    @property
    def prior_prompt(self) -> str:
        """The concept's class prompt without the concept (BlockLoRA's prior class, its Figure 3):
        the training template with the class alone ("a photo of sneaker"), or a style's training
        object without the style ("image of butterfly")."""
        if self.kind == "object":
            return OBJECT_TRAIN_TEMPLATE.format(self.class_name)
        return f"image of {concept_phrase(self.class_name)}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        if not isinstance(d, dict):
            raise DatasetError(f"a task must be a JSON object, got {type(d).__name__}")
        expected = {field.name for field in fields(cls)}
        missing = sorted(expected - d.keys())
        unknown = sorted(d.keys() - expected)
        if missing or unknown:
            raise DatasetError(
                f"task {d.get('concept', '?')!r} does not match the Task fields "
                f"(missing: {missing or 'none'}, unknown: {unknown or 'none'}); regenerate the task list"
            )
        return cls(**d)


def concept_phrase(directory_name: str) -> str:
    """The prompt form of a style or object directory name: ``Palette_Knife`` -> ``palette knife``."""
    return directory_name.lower().replace("_", " ")


def _check_num_tasks(num_tasks: int) -> None:
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise DatasetError(f"num_tasks must be a positive integer, got {num_tasks!r}")


def _check_explicit_names(
    names: Sequence[str], available: Iterable[str], what: str, root: str | os.PathLike[str], config_key: str
) -> list[str]:
    names = list(names)
    available = sorted(available)
    if not names:
        raise DatasetError(f"the {config_key} list is empty; list at least one {what} or leave it unset")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"the {config_key} list names {', '.join(duplicates)} more than once")
    for name in names:
        if name not in available:
            raise DatasetError(
                f"{what} {name!r} from the {config_key} list is not in the dataset at "
                f"{Path(root).absolute()}; available {what}s: {', '.join(available)}"
            )
    return names


def select_object_tasks(
    root: str | os.PathLike[str],
    num_tasks: int = 10,
    tokens: Sequence[str] = OBJECT_TOKENS,
    seed: int = 42,
    subjects: Sequence[str] | None = None,
    config_key: str = "the dataset root",
    eval_templates: Sequence[str] = OBJECT_EVAL_TEMPLATES,
) -> list[Task]:
    """Select DreamBooth object tasks the reference's way (see the module docstring)."""
    dataset = read_dreambooth(root, config_key)
    subjects_of_class: dict[str, list[str]] = {}
    for subject in sorted(dataset):
        subjects_of_class.setdefault(dataset[subject]["class"], []).append(subject)

    if subjects is None:
        _check_num_tasks(num_tasks)
        classes = sorted(subjects_of_class)
        if len(classes) < num_tasks:
            raise DatasetError(
                f"the DreamBooth dataset at {Path(root).absolute()} has {len(classes)} object classes "
                f"but num_tasks is {num_tasks} (one subject per class); lower num_tasks to at most {len(classes)}"
            )
        rng = random.Random(seed)
        selected_classes = rng.sample(classes, num_tasks)
        # One choice per class, in selection order: same call order as the reference's dict comprehension.
        chosen = [(rng.choice(subjects_of_class[class_name]), class_name) for class_name in selected_classes]
    else:
        names = _check_explicit_names(subjects, dataset, "subject", root, "subjects")
        chosen = [(subject, dataset[subject]["class"]) for subject in names]

    tokens = list(tokens)
    if len(tokens) < len(chosen):
        raise DatasetError(
            f"{len(chosen)} object tasks need {len(chosen)} rare tokens but only {len(tokens)} are "
            f"given ({', '.join(tokens)}); add tokens or lower num_tasks"
        )
    if len(set(tokens)) != len(tokens):
        raise DatasetError(f"the object tokens must be distinct, got {', '.join(tokens)}")

    tasks = []
    for (subject, class_name), token in zip(chosen, tokens):
        images = tuple(dataset[subject]["images"])
        check_images_decode(images)
        identifier = f"{token} {class_name}"
        tasks.append(
            Task(
                concept=subject,
                kind="object",
                token=token,
                class_name=class_name,
                train_images=images,
                train_prompt=OBJECT_TRAIN_TEMPLATE.format(identifier),
                eval_prompts=tuple(template.format(identifier) for template in eval_templates),
                reference_images=images,
            )
        )
    return tasks


def _check_style_folders(
    dataset, root_path: Path, styles, train_objects, metric_objects, train_images_per_style: int
) -> None:
    """Every selected style has its training object's and every metric object's folder, and
    enough training images."""
    for style, train_object in zip(styles, train_objects):
        for obj in [train_object, *metric_objects]:
            if obj not in dataset[style]:
                raise DatasetError(
                    f"style directory {root_path / style} has no object directory {obj!r}, which the "
                    f"selection needs; restore {root_path / style / obj} or choose other styles"
                )
        available = len(dataset[style][train_object])
        if available < train_images_per_style:
            raise DatasetError(
                f"{root_path / style / train_object} has {available} images but "
                f"train_images_per_style is {train_images_per_style}; lower train_images_per_style "
                f"to at most {available} or add images"
            )


def select_style_tasks(
    root: str | os.PathLike[str],
    num_tasks: int = 10,
    seed: int = 42,
    train_images_per_style: int = 5,
    styles: Sequence[str] | None = None,
    config_key: str = "the dataset root",
    eval_templates: Sequence[str] = STYLE_EVAL_TEMPLATES,
) -> list[Task]:
    """Select UnlearnCanvas style tasks the reference's way (see the module docstring)."""
    dataset = read_unlearncanvas(root, config_key)
    root_path = Path(root).absolute()
    style_names = sorted(dataset)
    object_names = sorted({obj for objects in dataset.values() for obj in objects})

    if styles is None:
        _check_num_tasks(num_tasks)
        if len(style_names) < num_tasks:
            raise DatasetError(
                f"the UnlearnCanvas dataset at {root_path} has {len(style_names)} styles but num_tasks "
                f"is {num_tasks}; lower num_tasks to at most {len(style_names)}"
            )
        task_count = num_tasks
    else:
        explicit_styles = _check_explicit_names(styles, style_names, "style", root, "styles")
        task_count = len(explicit_styles)
    if len(object_names) < task_count + 1:
        raise DatasetError(
            f"the UnlearnCanvas dataset at {root_path} has {len(object_names)} object classes, but "
            f"{task_count} style tasks need {task_count} training objects plus at least one held-out "
            f"metric object; lower num_tasks to at most {len(object_names) - 1}"
        )
    if train_images_per_style < 1:
        raise DatasetError(f"train_images_per_style must be at least 1, got {train_images_per_style!r}")

    rng = random.Random(seed)
    train_objects = rng.sample(object_names, task_count)
    metric_objects = [obj for obj in object_names if obj not in train_objects]
    selected_styles = rng.sample(style_names, task_count) if styles is None else explicit_styles

    _check_style_folders(dataset, root_path, selected_styles, train_objects, metric_objects, train_images_per_style)

    # The reference draws from 1..20 (UnlearnCanvas has 20 images per folder); use the smallest
    # metric-folder size so smaller copies work too (identical on the real dataset).
    index_count = min(len(dataset[style][obj]) for style in selected_styles for obj in metric_objects)
    metric_indices = rng.choices(range(1, index_count + 1), k=len(metric_objects))

    tasks = []
    for style, train_object in zip(selected_styles, train_objects):
        # The reference samples from sorted(os.listdir(...)): lexicographic file names.
        listing = sorted(dataset[style][train_object], key=lambda path: Path(path).name)
        train_images = tuple(sorted(rng.sample(listing, train_images_per_style), key=image_sort_key))
        reference_images = tuple(dataset[style][obj][index - 1] for obj, index in zip(metric_objects, metric_indices))
        check_images_decode(train_images + reference_images)
        phrase = concept_phrase(style)
        tasks.append(
            Task(
                concept=style,
                kind="style",
                token=None,
                class_name=train_object,
                train_images=train_images,
                train_prompt=STYLE_TRAIN_TEMPLATE.format(phrase, concept_phrase(train_object)),
                eval_prompts=tuple(template.format(phrase) for template in eval_templates),
                reference_images=reference_images,
            )
        )
    return tasks


def order_tasks(tasks: Sequence[Task], order_seed: int) -> list[Task]:
    """A shuffled copy: the reference's ``random.seed(order_seed); random.shuffle(tasks)``."""
    ordered = list(tasks)
    random.Random(order_seed).shuffle(ordered)
    return ordered


def write_tasks(path: str | os.PathLike[str], tasks: Iterable[Task], **meta: Any) -> None:
    """Write ``{"tasks": [...], **meta}`` as indented JSON, atomically (temp file + os.replace)."""
    if "tasks" in meta:
        raise TypeError("write_tasks: 'tasks' is reserved for the task list and cannot be a meta key")
    # Serialise first: an unserialisable meta value must not leave a partial file behind.
    text = json.dumps({"tasks": [task.to_dict() for task in tasks], **meta}, indent=2, ensure_ascii=False) + "\n"
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
            temp_file.write(text)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _load_task_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    file_path = Path(path)
    if not file_path.is_file():
        raise DatasetError(f"task list {file_path} does not exist; run the task selection step first")
    try:
        content = json.loads(file_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"task list {file_path} is not valid JSON ({error}); delete it and re-run the selection"
        ) from error
    if not isinstance(content, dict) or not isinstance(content.get("tasks"), list):
        raise DatasetError(
            f"task list {file_path} must be a JSON object with a 'tasks' list; delete it and re-run the selection"
        )
    return content


def read_tasks(path: str | os.PathLike[str]) -> list[Task]:
    """The tasks of a file written by :func:`write_tasks`, in file order."""
    return [Task.from_dict(entry) for entry in _load_task_file(path)["tasks"]]


def read_task_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``**meta`` entries of a file written by :func:`write_tasks` (everything but "tasks")."""
    return {key: value for key, value in _load_task_file(path).items() if key != "tasks"}
