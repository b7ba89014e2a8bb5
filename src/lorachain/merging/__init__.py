"""Merging independently trained concept LoRAs into one model, and diagnosing how they interfere.

Methods behind one interface (:mod:`lorachain.merging.base`) and a registry:
``weighted_average`` (DB-LoRA / FedAvg), ``ties``, ``dare`` (through peft's merge_utils),
``orthogonal_adaptation`` (Po et al.), ``blocklora`` (BlockLoRA) and ``gradient_fusion``
(Mix-of-Show, closed form). :mod:`lorachain.merging.lora_files` reads LoRA files,
:mod:`lorachain.merging.diagnostics` measures cosine similarity and sign conflicts between deltas
(BlockLoRA paper, Figure 4), :mod:`lorachain.merging.fusion` records layer inputs.
"""

from lorachain.merging import blocklora, dare, gradient_fusion, orthogonal_adaptation, ties, weighted_average  # noqa: F401  (registration)
from lorachain.merging.base import (
    Concept,
    MergeError,
    MergeMethod,
    linear_combination,
    make_merge,
    merge_class,
    merge_names,
    register_merge,
)
from lorachain.merging.lora_files import LoraFile, LoraFileError, check_compatible, read_lora

__all__ = [
    "Concept", "MergeError", "MergeMethod", "linear_combination", "make_merge", "merge_class", "merge_names", "register_merge",
    "LoraFile", "LoraFileError", "check_compatible", "read_lora",
]
