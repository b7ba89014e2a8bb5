"""What a built world measures: how well the base model draws it, and how well each metric reads it.

* base: samples of "a photo of a {class}" classified by a held-out nearest-centroid classifier
  (the world's DINO features, centroids of renders no model was trained on); and samples of
  "a photo of {name} {class}" identified among all named instances, which says whether a rare word
  selects an identity in the base model, as it must for personalization to start from a prior;
* dino: nearest-reference identification of the concepts (unseen identities);
* clip: text-to-image retrieval on held-out captioned images (a hit: the caption matches);
* csd: identification of the concept styles (unseen looks) on objects other than the references'.
Every figure comes with its chance level.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorachain.torch_env import torch
from lorachain.world import scene
from lorachain.world.corpus import CONCEPT_STREAM, HELD_OUT_STREAM, build_corpus
from lorachain.world.datasets import render_concept_object, render_concept_style
from lorachain.world.spec import WorldSpec

_CENTROID_STREAM, _QUERY_STREAM, _RENDER_STREAM = 30, 31, 32


def _images(pixel_list) -> list:
    return [scene.to_image(pixels) for pixels in pixel_list]


def _nearest(queries: torch.Tensor, references: torch.Tensor, reference_labels: list) -> list:
    """Label of the nearest class mean (cosine) for every query row."""
    labels = sorted(set(reference_labels))
    index = torch.tensor([labels.index(label) for label in reference_labels])
    means = torch.stack([references[index == i].mean(0) for i in range(len(labels))])
    means = torch.nn.functional.normalize(means, dim=-1)
    return [labels[i] for i in (queries @ means.T).argmax(1).tolist()]


def _accuracy(predicted: list, truth: list) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def _sample(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 5.0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pil"
    ).images


def class_centroid_images(spec: WorldSpec, per_class: int, stream: int = _CENTROID_STREAM):
    pixels, labels = [], []
    for shape in scene.CLASSES:
        for index in range(per_class):
            rng = np.random.default_rng([spec.seed, stream, scene.CLASSES.index(shape), index])
            colour = list(scene.COLOURS)[int(rng.integers(len(scene.COLOURS)))]
            background = list(scene.BACKGROUNDS)[int(rng.integers(len(scene.BACKGROUNDS)))]
            pixels.append(scene.render_object(shape, colour, background, spec.resolution, rng))
            labels.append(shape)
    return _images(pixels), labels


def instance_images(spec: WorldSpec, instances, per_instance: int, stream: int):
    pixels, labels = [], []
    for which, item in enumerate(instances):
        for index in range(per_instance):
            rng = np.random.default_rng([spec.seed, stream, which, index])
            pixels.append(scene.render_instance(item, spec.resolution, rng))
            labels.append(item.name)
    return _images(pixels), labels


def evaluate_base(spec: WorldSpec, pipe, dino, samples: int = 8) -> dict:
    centroid_images, centroid_labels = class_centroid_images(spec, per_class=16)
    references = dino.embed_images(centroid_images)
    # The classifier's own accuracy on fresh renders: the ceiling of class recognition on samples,
    # without which a low recognition figure cannot be told from a classifier that reads no class.
    render_images, render_labels = class_centroid_images(spec, per_class=samples, stream=_RENDER_STREAM)
    render_predicted = _nearest(dino.embed_images(render_images), references, centroid_labels)
    prompts = [f"a photo of a {shape}" for shape in scene.CLASSES for _ in range(samples)]
    truth = [shape for shape in scene.CLASSES for _ in range(samples)]
    predicted = _nearest(dino.embed_images(_sample(pipe, prompts, spec.seed)), references, centroid_labels)

    named = spec.instances[: min(16, len(spec.instances))]
    instance_refs, instance_labels = instance_images(spec, spec.instances, 4, _CENTROID_STREAM + 100)
    named_prompts = [f"a photo of {item.name} {item.shape}" for item in named for _ in range(4)]
    named_truth = [item.name for item in named for _ in range(4)]
    named_predicted = _nearest(
        dino.embed_images(_sample(pipe, named_prompts, spec.seed + 1)),
        dino.embed_images(instance_refs),
        instance_labels,
    )
    return {
        "class_recognition": _accuracy(predicted, truth),
        "classifier_on_renders": _accuracy(render_predicted, render_labels),
        "class_chance": 1 / len(scene.CLASSES),
        "instance_identification": _accuracy(named_predicted, named_truth),
        "instance_chance": 1 / len(spec.instances),
    }


def evaluate_dino(spec: WorldSpec, dino, queries_per_concept: int = 6) -> dict:
    references = [
        render_concept_object(spec, c, CONCEPT_STREAM, i)
        for c in spec.object_concepts
        for i in range(spec.images_per_concept)
    ]
    reference_labels = [c.name for c in spec.object_concepts for _ in range(spec.images_per_concept)]
    queries = [
        render_concept_object(spec, c, _QUERY_STREAM, i)
        for c in spec.object_concepts
        for i in range(queries_per_concept)
    ]
    truth = [c.name for c in spec.object_concepts for _ in range(queries_per_concept)]
    predicted = _nearest(dino.embed_images(_images(queries)), dino.embed_images(_images(references)), reference_labels)
    return {"concept_identification": _accuracy(predicted, truth), "chance": 1 / max(len(spec.object_concepts), 1)}


def evaluate_clip(spec: WorldSpec, clip, count: int = 256) -> dict:
    corpus = build_corpus(spec, count, stream=HELD_OUT_STREAM)
    images = clip.embed_images(_images(corpus.images))
    texts = clip.embed_texts(corpus.captions)
    best = (texts @ images.T).argmax(1).tolist()
    hits = [corpus.captions[j] == corpus.captions[i] for i, j in enumerate(best)]
    chance = np.mean([np.mean([c == d for d in corpus.captions]) for c in corpus.captions])
    return {"text_to_image_retrieval": float(np.mean(hits)), "chance": float(chance), "candidates": count}


def evaluate_csd(spec: WorldSpec, csd, queries_per_style: int = 6) -> dict:
    reference_shapes, query_shapes = scene.CLASSES[:4], scene.CLASSES[4:]
    references, labels = [], []
    for style in spec.style_concepts:
        for shape in reference_shapes:
            references.append(render_concept_style(spec, style, shape, CONCEPT_STREAM, 0))
            labels.append(style.name)
    queries, truth = [], []
    for style in spec.style_concepts:
        for index in range(queries_per_style):
            queries.append(render_concept_style(spec, style, query_shapes[index % 4], _QUERY_STREAM, index))
            truth.append(style.name)
    predicted = _nearest(csd.embed_images(_images(queries)), csd.embed_images(_images(references)), labels)
    return {"style_identification": _accuracy(predicted, truth), "chance": 1 / max(len(spec.style_concepts), 1)}


def write_evaluation(evaluation: dict, path: str | Path, markdown: str | Path) -> None:
    path = Path(path)
    path.write_text(json.dumps(evaluation, indent=2, sort_keys=True) + "\n")
    rows = [
        (
            "base: prompted class recognised (held-out classifier)",
            evaluation["base"]["class_recognition"],
            evaluation["base"]["class_chance"],
        ),
        (
            "classifier: class of fresh renders (the ceiling of the row above)",
            evaluation["base"]["classifier_on_renders"],
            evaluation["base"]["class_chance"],
        ),
        (
            "base: named instance identified",
            evaluation["base"]["instance_identification"],
            evaluation["base"]["instance_chance"],
        ),
        (
            "dino: concept identified by nearest reference",
            evaluation["dino"]["concept_identification"],
            evaluation["dino"]["chance"],
        ),
        ("clip: text-to-image retrieval", evaluation["clip"]["text_to_image_retrieval"], evaluation["clip"]["chance"]),
        ("csd: concept style identified", evaluation["csd"]["style_identification"], evaluation["csd"]["chance"]),
    ]
    table = ["| what | accuracy | chance |", "|---|---|---|"] + [f"| {a} | {b:.3f} | {c:.3f} |" for a, b, c in rows]
    Path(markdown).write_text("# The miniature world, measured\n\n" + "\n".join(table) + "\n")
