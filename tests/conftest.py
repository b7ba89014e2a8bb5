"""Shared fixtures: tiny SD1 / SDXL pipelines saved to disk, and synthetic 64 px training images.

Everything runs offline on a CPU: the tiny pipelines are built from config with seeded random
weights (lorachain.models.tiny) and the images are written by lorachain.data's generator.
"""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub / transformers / diffusers: no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Three DreamBooth-like subjects: one per task of the short chains in the tests.
SYNTHETIC_SUBJECTS = {"backpack": "backpack", "teapot": "teapot", "colorful_sneaker": "sneaker"}


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline written by save_pretrained (safetensors, fp32)."""
    from lorachain.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd1", tmp_path_factory.mktemp("tiny") / "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLPipeline written by save_pretrained (safetensors, fp32)."""
    from lorachain.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Root of a DreamBooth-layout synthetic dataset: 3 subjects x 3 JPEGs of 64 px."""
    from lorachain.data import generate_dreambooth_like

    return generate_dreambooth_like(tmp_path_factory.mktemp("data") / "dreambooth", subjects=SYNTHETIC_SUBJECTS, images_per_subject=3, size=64, seed=0)


@pytest.fixture(scope="session")
def synthetic_tasks(synthetic_dataset) -> list[tuple[str, list[str]]]:
    """(train prompt, image paths) of one task per synthetic subject, in a fixed order."""
    return [
        (f"a photo of sks {class_name}", sorted(str(p) for p in (synthetic_dataset / subject).glob("*.jpg")))
        for subject, class_name in SYNTHETIC_SUBJECTS.items()
    ]


@pytest.fixture(scope="session")
def synthetic_images(synthetic_tasks) -> list[str]:
    """A few 64 px JPEG paths (the first subject's images)."""
    return synthetic_tasks[0][1]
