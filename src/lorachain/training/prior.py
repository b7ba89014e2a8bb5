"""Prior preservation's class images (DreamBooth, diffusers' train_dreambooth_lora.py
``--with_prior_preservation``): the base model's own images of each object class, generated once
per domain and reused by every task, method, order and seed that trains a concept of that class.

``<dir>/<class name>/<index>.png``, ``training.num_class_images`` per class, sampled with the base
pipeline on :func:`class_prompt` through the sampling code (the ``sampling`` block's steps,
guidance, resolution, scheduler and precision) from seeded initial noises of their own
(:data:`CLASS_NOISE_OFFSET`), so the same inputs give byte-identical files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lorachain.training.config import TrainingError

CLASS_PROMPT = "a photo of a {}"
# The class images' initial noises: sampling.noise_seed + this, so they are not the noises the
# evaluation (and its prior-drift metrics) samples the base model from.
CLASS_NOISE_OFFSET = 1


def class_prompt(class_name: str) -> str:
    """The prompt of a class's images and of the prior term: "a photo of a sneaker"."""
    return CLASS_PROMPT.format(class_name)


def class_names(tasks) -> list[str]:
    """The object classes of `tasks` (lorachain.data.Task), sorted, each once."""
    return sorted({task.class_name for task in tasks if task.kind == "object"})


def check_prior_task(task, key: str = "training.prior_preservation") -> None:
    """Refuse prior preservation for a concept without a class word (a style)."""
    if task.kind != "object":
        raise TrainingError(
            f"config key {key}: concept {task.concept!r} is a {task.kind}, which has no class word to "
            f"preserve the prior of; turn {key} off for this domain"
        )


def class_images_of(directory: str | Path, class_name: str, count: int) -> list[str]:
    """The first `count` class images of `class_name` under `directory`, sorted by name."""
    folder = Path(directory) / class_name
    images = sorted(str(path) for path in folder.glob("*.png"))
    if len(images) < count:
        raise TrainingError(
            f"{folder}: {len(images)} class images, training.num_class_images asks for {count}; "
            f"delete {directory} so that the class_images rule generates them again"
        )
    return images[:count]


def write_class_images(pipe, names: list[str], count: int, sampling, output_dir: str | Path) -> int:
    """Sample `count` images of every class in `names` with `pipe` into ``output_dir/<class>/``
    (staged: a failed job leaves nothing). Returns how many images were written."""
    from lorachain.sample import render_prompts, staged_directory

    config = dataclasses.replace(sampling, num_samples=count, noise_seed=sampling.noise_seed + CLASS_NOISE_OFFSET)
    written = 0
    with staged_directory(output_dir) as staging:
        for name in names:
            folder = staging / name
            folder.mkdir()
            jobs = [(class_prompt(name), index) for index in range(count)]
            for index, image in enumerate(render_prompts(pipe, jobs, config)):
                image.save(folder / f"{index:04d}.png")
                written += 1
    return written


def class_images_job(
    *, tasks, sampling: dict, num_class_images: int, model: str, vae: str | None, class_images
) -> dict:
    """The class_images job: `num_class_images` base-model images of every object class of the
    domain's reference task file `tasks` into the directory `class_images`."""
    from lorachain.data import read_tasks
    from lorachain.sample import SamplingConfig, load_model_for_sampling

    sampling_config = SamplingConfig.from_dict(dict(sampling))
    names = class_names(read_tasks(tasks))
    pipe = load_model_for_sampling(model, vae, None, None, None, sampling_config.precision)
    written = write_class_images(pipe, names, int(num_class_images), sampling_config, class_images)
    return {"classes": names, "images": written}
