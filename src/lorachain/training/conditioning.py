"""What the denoiser is conditioned and trained on: training images (one seeded crop each), the
prompt's conditioning (:mod:`lorachain.models.denoisers`) and SDXL's time ids. Shared by the
trainer and :mod:`lorachain.modular`'s layer-input recorder."""

from __future__ import annotations

from pathlib import Path

from lorachain.torch_env import torch
from lorachain.training.config import TrainingError


def load_training_image(path: str | Path, resolution: int, generator: torch.Generator):
    """Short-side resize to `resolution`, one seeded random crop, no flip; values in [-1, 1].
    Returns the tensor, the original (h, w) and the crop's (top, left): SDXL conditions on both."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise TrainingError(f"{path}: cannot decode training image ({error}); replace or remove it") from None
    original = (image.height, image.width)
    factor = resolution / min(image.size)
    size = (max(resolution, round(image.width * factor)), max(resolution, round(image.height * factor)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    top = int(torch.randint(0, image.height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, image.width - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0, original, (top, left)


@torch.no_grad()
def encode_condition(pipe, prompt: str, device) -> dict:
    """The denoiser's conditioning for one prompt: encoder states, plus SDXL's pooled embedding
    (SD3: the pooled projections; FLUX: those and the text position ids)."""
    return encode_condition_with_grad(pipe, prompt, device)


def encode_condition_with_grad(pipe, prompt: str, device) -> dict:
    """:func:`encode_condition` with autograd on: what embedding tuning differentiates at every step."""
    from lorachain.models.denoisers import family_of

    return family_of(pipe).encode(pipe, prompt, device)


def sdxl_time_ids(condition: dict, images, resolution: int, device) -> torch.Tensor | None:
    """SDXL's time ids of the loaded training `images` (original size, crop, target size); None
    when the condition has no pooled embedding (SD 1.x)."""
    if "text_embeds" not in condition:
        return None
    return torch.tensor(
        [[*original, *crop, resolution, resolution] for _, original, crop in images], dtype=torch.float32, device=device
    )
