"""Weighted averaging (DB-LoRA / FedAvg): W = W0 + sum_i alpha_i B_i A_i with sum_i alpha_i = 1.

BlockLoRA paper Eq. 2. The sum is formed exactly, per layer, as sum_i alpha_i * scale_i * B_i @ A_i.
peft's ``add_weighted_adapter`` with ``combination_type="linear"`` instead combines the A's and the
B's separately (B' = sum sqrt(alpha_i) B_i, A' = sum sqrt(alpha_i) A_i), whose product carries the
cross terms sqrt(alpha_i alpha_j) B_i A_j (i != j) that no concept trained (peft issue #3004); its
``cat`` combination is exact and equals this method.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorachain.lora import Concept, linear_combination
from lorachain.methods.merge_base import MergeMethod, register_merge, weights_param


@register_merge
class WeightedAverage(MergeMethod):
    name = "weighted_average"
    weights_sum_to_one = True
    param_specs = (weights_param("mean", "alpha_i; they must sum to 1"),)
    requirement = "weighted averaging (BlockLoRA paper Eq. 2) requires weights that sum to 1"

    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]):
        return linear_combination([concept.adapters[layer] for concept in concepts], weights)

    def low_rank_terms(self, layer, concepts, weights):
        return [(weight, concept.adapters[layer]) for concept, weight in zip(concepts, weights)]
