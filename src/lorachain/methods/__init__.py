"""Continual methods behind one interface (:mod:`lorachain.methods.base`) and a registry."""

from lorachain.methods import blocklora, magmax, merge_init, naive, ortho_init, orthogonal_adaptation  # noqa: F401  (registration)
from lorachain.methods.base import (
    ContinualMethod,
    InitContext,
    LayerAdapter,
    MethodError,
    make_method,
    method_names,
    register_method,
)

__all__ = ["ContinualMethod", "InitContext", "LayerAdapter", "MethodError", "make_method", "method_names", "register_method"]
