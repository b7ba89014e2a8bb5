"""TIES merging (Yadav et al., NeurIPS 2023) of the concepts' full deltas, through peft's math.

Per layer the dense deltas delta_i = scale_i B_i A_i go to ``peft.utils.merge_utils.ties``: keep the
``density`` fraction of largest-magnitude entries of each delta (trim), elect each entry's sign by
the sign of the summed (``"total"``) or counted (``"frequency"``) values, then average the weighted
entries that agree with the elected sign (disjoint mean).

Defaults: ``density`` 0.2 (the TIES paper keeps the top 20 %), ``majority_sign_method`` "total"
(the paper's sign election by total mass), ``weights`` the constant 1.0 (the disjoint mean already
averages; 1.0 is task arithmetic's unscaled lambda). Any non-negative constant or list is accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorachain.lazy_torch import torch
from lorachain.lora import Concept
from lorachain.methods.merge_base import MergeMethod, register_merge, weights_param
from lorachain.params import Param

SIGN_METHODS = ("total", "frequency")
SIGN_METHOD = Param(
    "majority_sign_method",
    "total",
    {"type": "string", "enum": list(SIGN_METHODS)},
    "sign election by the summed (total) or counted (frequency) values",
)


def density_param(default: float) -> Param:
    return Param(
        "density",
        default,
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "fraction of each delta's entries kept",
    )


class PeftTensorMerge(MergeMethod):
    """What the merges built on ``peft.utils.merge_utils`` share: a kept fraction ``density`` of
    each delta's entries and a sign-election rule. Not registered itself."""

    param_specs = (weights_param(1.0), density_param(0.2), SIGN_METHOD)

    @classmethod
    def load_dependencies(cls) -> None:
        import peft.utils.merge_utils  # noqa: F401  (peft's import takes seconds: not part of the merge time)


@register_merge
class Ties(PeftTensorMerge):
    name = "ties"

    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]):
        from peft.utils.merge_utils import ties

        deltas = [concept.delta(layer).float() for concept in concepts]
        return ties(
            deltas,
            torch.tensor(weights, dtype=torch.float32, device=deltas[0].device),
            density=float(self.params["density"]),
            majority_sign_method=self.params["majority_sign_method"],
        )
