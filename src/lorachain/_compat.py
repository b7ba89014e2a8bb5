"""Make torchvision importable next to a CPU-only torch.

PyPI's torchvision 0.28.0 (the only release that pairs with torch 2.13.0) is a CUDA build: its
compiled ops library needs ``libtorch_cuda.so``, fails to load on CPU torch, and then
``torchvision/_meta_registrations.py`` dies in ``register_fake("torchvision::nms")`` because the
operator was never declared. transformers imports torchvision whenever it is installed, so without
this even ``import diffusers`` fails. Declaring the two operator schemas that torchvision registers
fake kernels for lets every pure-Python part of torchvision (transforms, models; what open_clip and
timm use) import; only its compiled ops stay unavailable, and the project decodes images with PIL.

Where torchvision's own library loads (a CUDA machine, or a matching CPU build) the real schemas
exist and nothing is declared.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# Kept alive for the life of the process: dropping a torch.library.Library removes its definitions.
_declared_library = None

_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def torchvision_ops_library() -> Path | None:
    """Path of torchvision's compiled ops library, or None when torchvision is not installed."""
    spec = importlib.util.find_spec("torchvision")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidates = sorted(Path(location).glob("_C*.so")) + sorted(Path(location).glob("_C*.pyd"))
        if candidates:
            return candidates[0]
    return None


def ensure_torchvision_importable() -> str:
    """Prepare torch so that a later ``import torchvision`` succeeds. Returns what was done:
    ``"absent"`` (no torchvision), ``"native"`` (its compiled ops loaded), ``"declared"``
    (schemas declared because the compiled ops cannot load), or ``"already-imported"``."""
    global _declared_library
    if "torchvision" in sys.modules:
        return "already-imported"
    if _declared_library is not None:
        return "declared"
    library_path = torchvision_ops_library()
    if library_path is None:
        return "absent"
    import torch

    try:
        torch.ops.load_library(str(library_path))
        return "native"
    except OSError:
        pass  # a CUDA build on CPU torch: libtorch_cuda.so is missing
    _declared_library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OP_SCHEMAS:
        _declared_library.define(schema)
    return "declared"
