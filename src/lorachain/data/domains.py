"""A domain's config block -> its ordered task list (what the prepare_tasks step runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .datasets import DatasetError
from .selection import Task, order_tasks, select_object_tasks, select_style_tasks, write_tasks
from .synthetic import generate_dreambooth_like, generate_unlearncanvas_like

LAYOUTS = ("dreambooth", "unlearncanvas")


def select_domain_tasks(
    layout: str, root: str | os.PathLike[str], block: dict[str, Any], domain: str = "<domain>"
) -> list[Task]:
    """The reference's task selection for one domain block of the config (before ordering). Every
    error names the domain's config keys (domains.<domain>.dataset.root, num_tasks, concepts)."""
    try:
        return _select(layout, root, block, domain)
    except DatasetError as error:
        raise DatasetError(f"domain {domain!r} (config key domains.{domain}, dataset.root {root}): {error}") from None


def _select(layout: str, root: str | os.PathLike[str], block: dict[str, Any], domain: str) -> list[Task]:
    key = f"domains.{domain}.dataset.root"
    concepts = block.get("concepts")
    if concepts is not None and len(concepts) != block["num_tasks"]:
        raise DatasetError(
            f"domains.{domain}.concepts lists {len(concepts)} concepts but the selection needs {block['num_tasks']} "
            "(num_tasks, or task_pool when it is set); make them agree"
        )
    if block.get("eval_prompts"):
        for template in block["eval_prompts"]:
            if template.count("{}") != 1:
                raise DatasetError(
                    f"domains.{domain}.eval_prompts: {template!r} must hold the concept placeholder {{}} exactly once"
                )
    templates = {"eval_templates": tuple(block["eval_prompts"])} if block.get("eval_prompts") else {}
    if layout == "dreambooth":
        tokens = {"tokens": tuple(block["tokens"])} if block.get("tokens") else {}
        return select_object_tasks(
            root,
            num_tasks=block["num_tasks"],
            seed=block.get("selection_seed", 42),
            subjects=block.get("concepts"),
            config_key=key,
            **tokens,
            **templates,
        )
    if layout == "unlearncanvas":
        return select_style_tasks(
            root,
            num_tasks=block["num_tasks"],
            seed=block.get("selection_seed", 42),
            train_images_per_style=block.get("train_images_per_style", 5),
            styles=block.get("concepts"),
            config_key=key,
            **templates,
        )
    raise ValueError(f"unknown dataset layout {layout!r}; expected one of {LAYOUTS}")


def prepare_tasks(
    layout: str,
    root: str | os.PathLike[str],
    block: dict[str, Any],
    order_seed: int,
    output: str | os.PathLike[str],
    domain: str = "<domain>",
) -> list[Task]:
    """Select, order and write the tasks of one (domain, order seed)."""
    tasks = order_tasks(select_domain_tasks(layout, root, block, domain), order_seed)
    write_tasks(output, tasks, layout=layout, dataset_root=str(Path(root).resolve()), order_seed=order_seed)
    return tasks


def generate_synthetic(layout: str, root: str | os.PathLike[str], synthetic: dict[str, Any]) -> Path:
    """A generated dataset in the domain's native layout (demo and tests)."""
    common = dict(size=synthetic.get("size", 64), seed=synthetic.get("seed", 0))
    if layout == "dreambooth":
        return generate_dreambooth_like(root, images_per_subject=synthetic.get("images_per_concept", 4), **common)
    if layout == "unlearncanvas":
        return generate_unlearncanvas_like(root, images_per_object=synthetic.get("images_per_concept", 5), **common)
    raise ValueError(f"unknown dataset layout {layout!r}; expected one of {LAYOUTS}")


def generate_synthetic_dataset_job(*, layout: str, synthetic: dict[str, Any], root) -> dict:
    """The generate_synthetic_dataset job: a generated dataset of `layout` at `root`."""
    return {"layout": layout, "root": str(generate_synthetic(layout, root, synthetic))}


def prepare_tasks_job(*, layout: str, root, selection: dict[str, Any], order: int, domain: str, tasks) -> dict:
    """The prepare_tasks job: the task file `tasks` of one (domain, order seed)."""
    selected = prepare_tasks(layout, root, dict(selection), order, tasks, domain=domain)
    return {
        f"task {index:02d}": f"{task.concept} <- {task.train_prompt!r} ({len(task.train_images)} images)"
        for index, task in enumerate(selected, start=1)
    }
