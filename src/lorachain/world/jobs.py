"""The world's workflow jobs. Each writes into a temporary sibling and renames it into place only
when complete, so a build that dies never leaves a cached model that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from lorachain.world.ids import world_id
from lorachain.world.spec import build_spec


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]):
    """Yield a temporary path next to `target`; on success it replaces `target`, on failure it goes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial")
    shutil.rmtree(temporary, ignore_errors=True) if temporary.is_dir() else temporary.unlink(missing_ok=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True) if temporary.is_dir() else temporary.unlink(missing_ok=True)
        raise
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(temporary, target)


def _mark(directory: Path, block: dict, what: str) -> None:
    from lorachain.files import write_built_marker

    write_built_marker(directory, "world", world=world_id(block), model=what)


def world_data_job(*, world: dict, objects, styles) -> dict:
    """The world's concepts in the DreamBooth and UnlearnCanvas layouts."""
    from lorachain.world.datasets import write_objects, write_styles

    spec = build_spec(world)
    with atomic_path(objects) as temporary:
        write_objects(spec, temporary)
    with atomic_path(styles) as temporary:
        write_styles(spec, temporary)
    return {"objects": [c.name for c in spec.object_concepts], "styles": [s.name for s in spec.style_concepts]}


def pretrain_world_job(*, world: dict, pretrain: dict, output_dir) -> None:
    """The world's base pipeline (config key world.pretrain)."""
    from lorachain.world.pretrain import pretrain_pipeline

    with atomic_path(output_dir) as temporary:
        pretrain_pipeline(build_spec(world), pretrain, temporary)
        _mark(temporary, world, "pipeline")


def seed_initial_weights(seed: int, encoder: str) -> None:
    """Seed torch's global generator, which the encoders' layers draw their initial weights from:
    unseeded, two builds of one world got different encoders (and different scores)."""
    from lorachain.torch_env import torch

    torch.manual_seed(seed * 100 + ("dino", "clip", "csd").index(encoder))


def train_world_encoder_job(*, world: dict, encoder: str, training: dict, output) -> None:
    """One metric encoder trained on the world (config key world.encoders)."""
    from lorachain.world.metric_models import ENCODER_DEFAULTS, TRAINERS

    settings = {**ENCODER_DEFAULTS, **(training or {})}
    spec = build_spec(world)
    seed_initial_weights(spec.seed, encoder)
    with atomic_path(output) as temporary:
        if encoder == "csd":
            TRAINERS["csd"](spec, settings, temporary, world_id(world))
        else:
            temporary.mkdir()
            TRAINERS[encoder](spec, settings, temporary)
            _mark(temporary, world, encoder)


def evaluate_world_job(*, world: dict, pipeline, dino, clip, csd, evaluation, markdown) -> dict:
    """How well the base draws the world and how well each metric reads it."""
    from lorachain.metrics.encoders import load_encoder
    from lorachain.models.loading import load_pipeline
    from lorachain.world import evaluate

    spec = build_spec(world)
    pipe = load_pipeline(pipeline, key="model.pretrained")
    pipe.set_progress_bar_config(disable=True)
    this_world = world_id(world)  # each encoder must have been trained on this world
    encoders = {
        "dino": load_encoder("dino", {"pretrained": dino, "world": this_world}),
        "clip": load_encoder("clip", {"pretrained": clip, "world": this_world}),
        "csd": load_encoder("csd", {"checkpoint": csd, "world": this_world}),
    }
    result = {
        "world": this_world,
        "base": evaluate.evaluate_base(spec, pipe, encoders["dino"]),
        "dino": evaluate.evaluate_dino(spec, encoders["dino"]),
        "clip": evaluate.evaluate_clip(spec, encoders["clip"]),
        "csd": evaluate.evaluate_csd(spec, encoders["csd"]),
    }
    evaluate.write_evaluation(result, evaluation, markdown)
    return result
