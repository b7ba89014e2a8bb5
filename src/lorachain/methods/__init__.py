"""Continual methods and merge methods: one module per method (a paper method's training side and
merge side together: :mod:`~lorachain.methods.blocklora`, :mod:`~lorachain.methods.orthogonal_adaptation`),
the two interfaces with their registries (:mod:`~lorachain.methods.base` for continual methods,
:mod:`~lorachain.methods.merge_base` for merges), and :mod:`~lorachain.methods.registry`, which
builds the config schema's method and merge blocks from the registries, checks a config's blocks
by building them, and loads plugins.

Continual: ``naive``, ``merge_init``, ``ortho_init``, ``magmax``, ``blocklora``,
``orthogonal_adaptation``. Merges: ``weighted_average`` (DB-LoRA / FedAvg), ``ties``, ``dare``
(through peft's merge_utils), ``orthogonal_adaptation`` (Po et al.), ``blocklora`` (BlockLoRA) and
``gradient_fusion`` (Mix-of-Show, closed form). See docs/methods.md.

Importing this package (or any module in it) registers every built-in method, and imports no torch
until a method computes.
"""

from lorachain.lora import Concept, LayerAdapter, linear_combination
from lorachain.methods import (  # noqa: F401  (registration)
    blocklora,
    dare,
    gradient_fusion,
    magmax,
    merge_init,
    naive,
    ortho_init,
    orthogonal_adaptation,
    ties,
    weighted_average,
)
from lorachain.methods.base import (
    COMMON_PARAMS,
    ContinualMethod,
    EmbeddingSettings,
    InitContext,
    MethodError,
    make_method,
    method_class,
    method_names,
    register_method,
)
from lorachain.methods.merge_base import (
    MergeError,
    MergeMethod,
    make_merge,
    merge_class,
    merge_names,
    register_merge,
    weights_param,
)
from lorachain.methods.registry import PluginError, load_plugins, schema_defs

__all__ = [
    "COMMON_PARAMS",
    "Concept",
    "ContinualMethod",
    "EmbeddingSettings",
    "InitContext",
    "LayerAdapter",
    "MergeError",
    "MergeMethod",
    "MethodError",
    "PluginError",
    "linear_combination",
    "load_plugins",
    "make_merge",
    "make_method",
    "merge_class",
    "merge_names",
    "method_class",
    "method_names",
    "register_merge",
    "register_method",
    "schema_defs",
    "weights_param",
]
