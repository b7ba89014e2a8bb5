"""Datasets for continual personalisation: readers, validation, task selection and synthetic data.

Import-light on purpose (stdlib, NumPy, PIL; no torch): workflow steps that only select tasks or
check inputs use it.
"""

from .datasets import (
    IMAGE_SUFFIXES,
    DatasetError,
    check_images_decode,
    read_dreambooth,
    read_unlearncanvas,
)
from .selection import (
    OBJECT_EVAL_TEMPLATES,
    OBJECT_TOKENS,
    STYLE_EVAL_TEMPLATES,
    Task,
    concept_phrase,
    order_tasks,
    read_task_meta,
    read_tasks,
    select_object_tasks,
    select_style_tasks,
    write_tasks,
)
from .synthetic import generate_dreambooth_like, generate_unlearncanvas_like

__all__ = [
    "DatasetError",
    "IMAGE_SUFFIXES",
    "OBJECT_EVAL_TEMPLATES",
    "OBJECT_TOKENS",
    "STYLE_EVAL_TEMPLATES",
    "Task",
    "check_images_decode",
    "concept_phrase",
    "generate_dreambooth_like",
    "generate_unlearncanvas_like",
    "order_tasks",
    "read_dreambooth",
    "read_task_meta",
    "read_tasks",
    "read_unlearncanvas",
    "select_object_tasks",
    "select_style_tasks",
    "write_tasks",
]
