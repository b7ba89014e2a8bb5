"""Train the metric encoders on a world, with the real encoders' classes and file layouts.

Each encoder learns, contrastively (InfoNCE between two views), the invariance its metric
assumes on real data:
* dino (transformers ViTModel, CLS token): identity. Two renders of one identity (shape, colour,
  marking; new position, size, angle, background) are a positive pair;
* clip (transformers CLIPModel): text agreement. An image and its caption are a positive pair;
* csd (open_clip VisionTransformer plus CSD's raw style matrix): style. Two different class
  objects in one look (palette, texture) are a positive pair.
Identities and looks of the world's concepts are never trained on, so the held-out accuracies
(see lorachain.world.evaluate) measure what a metric does on concepts it has not seen.
Images are fed the way the scoring code feeds them (upsampled to 224 px, each encoder's mean/std).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np

from lorachain.torch_env import torch
from lorachain.world import scene
from lorachain.world.corpus import build_corpus
from lorachain.world.pretrain import log_progress, tokenize
from lorachain.world.spec import WorldSpec

ENCODER_DEFAULTS = {"steps": 400, "batch_size": 32, "learning_rate": 1.0e-3, "temperature": 0.1}
_INPUT = 224
_DINO_STREAM, _CSD_STREAM, _CLIP_STREAM = 20, 21, 22


def model_input(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> the encoders' [n, 3, 224, 224] input: bicubic up to 256, centre crop
    224 (DINO's protocol; for square images CLIP's resize-224 differs only by the crop margin).
    Bicubic resizing is linear and separable, so it is one matrix per side: R X R^T."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    resize = _resize_matrix(pixels.shape[-1])
    pixels = (resize @ pixels @ resize.T).clamp(0, 1)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@functools.cache
def _resize_matrix(size: int) -> torch.Tensor:
    """[224, size]: bicubic upsampling of one image side to 256, then the centre 224."""
    basis = torch.eye(size).view(size, 1, size, 1)
    columns = torch.nn.functional.interpolate(basis, size=(256, 1), mode="bicubic", align_corners=False)
    margin = (256 - _INPUT) // 2
    return columns.view(size, 256).T[margin : margin + _INPUT].contiguous()


def _info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, keys: list | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between rows of a and b; rows with equal `keys` (identical captions) are
    positives of each other, not negatives (soft targets over them)."""
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    if keys is None:
        targets = torch.arange(len(a))
    else:
        same = torch.tensor([[x == y for y in keys] for x in keys], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
    cross_entropy = torch.nn.functional.cross_entropy
    return 0.5 * (cross_entropy(logits, targets) + cross_entropy(logits.T, targets))


def _to_uint8(pixels) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def identity_pairs(spec: WorldSpec, step: int, batch: int, excluded: set) -> tuple[np.ndarray, np.ndarray]:
    """Two renders each of `batch` identities not in `excluded` (the concepts)."""
    rng = np.random.default_rng([spec.seed, _DINO_STREAM, step])
    identities = [ident for ident in scene.all_identities() if ident not in excluded]
    views = ([], [])
    for index in rng.choice(len(identities), batch, replace=False):
        shape, colour, marking, second = identities[index]
        with_marking = rng.random() < 0.75  # and plain class objects (shape, colour) as identities too
        for view in views:
            background = list(scene.BACKGROUNDS)[int(rng.integers(len(scene.BACKGROUNDS)))]
            args = (marking, second) if with_marking else (None, None)
            view.append(_to_uint8(scene.render_object(shape, colour, background, spec.resolution, rng, *args)))
    return np.stack(views[0]), np.stack(views[1])


def look_pairs(spec: WorldSpec, step: int, batch: int, excluded: set) -> tuple[np.ndarray, np.ndarray]:
    """Two different class objects each in `batch` looks not in `excluded` (the concept styles)."""
    rng = np.random.default_rng([spec.seed, _CSD_STREAM, step])
    looks = [look for look in scene.all_looks() if look[:2] not in excluded]
    views = ([], [])
    for index in rng.choice(len(looks), batch, replace=False):
        style = scene.Style("", *looks[index])
        shapes = rng.choice(len(scene.CLASSES), 2, replace=False)
        for view, shape in zip(views, shapes):
            view.append(_to_uint8(scene.render_styled(style, scene.CLASSES[shape], spec.resolution, rng)))
    return np.stack(views[0]), np.stack(views[1])


def _train(parameters, loss_of_step, settings: dict, name: str) -> None:
    optimizer = torch.optim.AdamW(parameters, lr=settings["learning_rate"], weight_decay=1e-4)
    steps = settings["steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * step / steps)))
    for step in range(steps):
        loss = loss_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            log_progress(f"{name} step {step}: loss {loss.item():.4f}")


def train_dino(spec: WorldSpec, settings: dict, output_dir: Path) -> Path:
    from lorachain.metrics.encoders import IMAGENET_MEAN, IMAGENET_STD, small_dino

    model = small_dino(width=64, layers=3, heads=4, patch_size=32)
    excluded = {(c.shape, c.colour, c.marking, c.marking_colour) for c in spec.object_concepts}

    def loss_of_step(step):
        a, b = identity_pairs(spec, step, settings["batch_size"], excluded)
        features = model(pixel_values=model_input(np.concatenate([a, b]), IMAGENET_MEAN, IMAGENET_STD))
        cls = features.last_hidden_state[:, 0]
        return _info_nce(cls[: len(a)], cls[len(a) :], settings["temperature"])

    _train(list(model.parameters()), loss_of_step, settings, "dino")
    model.eval().save_pretrained(output_dir)
    return output_dir


def train_clip(spec: WorldSpec, settings: dict, output_dir: Path) -> Path:
    from lorachain.metrics.encoders import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _features, save_clip, small_clip
    from lorachain.models.tokenizer import build_clip_tokenizer

    model = small_clip(width=64)
    corpus = build_corpus(spec, settings["steps"] * settings["batch_size"], stream=_CLIP_STREAM)
    token_ids = tokenize(build_clip_tokenizer(), corpus.captions)
    batch = settings["batch_size"]

    def loss_of_step(step):
        window = slice(step * batch, (step + 1) * batch)
        pixels = model_input(corpus.images[window], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        image = _features(model.get_image_features(pixel_values=pixels))
        text = _features(model.get_text_features(input_ids=token_ids[window]))
        # Identical captions in one batch are not negatives of each other: soft targets over them.
        return _info_nce(image, text, settings["temperature"], keys=corpus.captions[window])

    _train(list(model.parameters()), loss_of_step, settings, "clip")
    save_clip(model.eval(), output_dir)
    return output_dir


def train_csd(spec: WorldSpec, settings: dict, checkpoint: Path, world_id: str) -> Path:
    from lorachain.metrics.encoders import (
        OPENAI_CLIP_MEAN,
        OPENAI_CLIP_STD,
        _csd_backbone,
        _CsdModel,
        save_csd_checkpoint,
    )

    width, dim = 64, 32
    model = _CsdModel(_csd_backbone(_INPUT, 32, width, layers=3, mlp_width=2 * width), width, dim)
    excluded = {(s.palette, s.texture) for s in spec.style_concepts}

    def loss_of_step(step):
        a, b = look_pairs(spec, step, settings["batch_size"], excluded)
        features = model(model_input(np.concatenate([a, b]), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
        return _info_nce(features[: len(a)], features[len(a) :], settings["temperature"])

    _train(list(model.parameters()), loss_of_step, settings, "csd")
    save_csd_checkpoint(model.eval(), checkpoint, argparse.Namespace(arch="world-vit", world=world_id))
    return checkpoint


TRAINERS = {"dino": train_dino, "clip": train_clip, "csd": train_csd}
