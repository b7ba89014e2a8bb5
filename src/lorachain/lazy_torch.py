"""torch for modules that must import without it: the method and merge registries are read while
the Snakefile is parsed (schema, parameter checks, ``needs_layer_inputs``), where importing torch
would cost seconds per Snakemake process. ``torch`` here is a stand-in that imports
:mod:`lorachain.torch_env` (torchvision prepared first) on its first attribute access and then
forwards every attribute to the real module.

Modules using it must not touch torch at import time (no ``torch.float32`` default arguments, no
``@torch.no_grad()`` decorators); ``tests/test_imports.py`` checks that importing the registries
leaves torch unimported.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyTorch:
    __slots__ = ("_module",)

    def __init__(self):
        self._module: ModuleType | None = None

    def __getattr__(self, name: str):
        module = self._module
        if module is None:
            module = importlib.import_module("lorachain.torch_env").torch
            object.__setattr__(self, "_module", module)
        return getattr(module, name)

    def __repr__(self) -> str:
        return f"<lazy torch ({'imported' if self._module is not None else 'not imported yet'})>"


torch = _LazyTorch()

__all__ = ["torch"]
