"""The one place that imports torch for the library: it prepares torchvision first."""

from lorachain._compat import ensure_torchvision_importable

TORCHVISION_STATUS = ensure_torchvision_importable()

import torch  # noqa: E402  (must come after the torchvision preparation above)

__all__ = ["torch", "TORCHVISION_STATUS"]
