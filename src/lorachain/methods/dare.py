"""DARE (Yu et al., ICML 2024): drop and rescale each concept's full delta, through peft's math.

Per layer every dense delta delta_i = scale_i B_i A_i keeps each entry with probability ``density``
and is rescaled by 1/density (``peft.utils.merge_utils.prune(method="random", rescale=True)``), then
the deltas are combined by weighted sum (``variant: linear`` -> ``dare_linear``) or by TIES' sign
election and disjoint mean (``variant: ties`` -> ``dare_ties``).

peft draws the drop masks with torch's global RNG. Here each layer runs inside
``torch.random.fork_rng`` seeded with ``seed + index`` (index: the layer's position in sorted
order), so a merge is reproducible, independent of call order, and leaves the caller's RNG untouched.

Defaults: ``variant`` "linear", ``density`` 0.5 (drop half; LoRA deltas are dense low-rank products,
the 90 % drop rates DARE reports for full fine-tuning deltas of LLMs are not assumed to carry over),
``weights`` the constant 1.0, ``seed`` 0, ``majority_sign_method`` "total" (``variant: ties`` only).
"""

from __future__ import annotations

from collections.abc import Sequence

from lorachain.lazy_torch import torch
from lorachain.lora import Concept
from lorachain.methods.merge_base import register_merge, weights_param
from lorachain.methods.ties import SIGN_METHOD, PeftTensorMerge, density_param
from lorachain.params import Param

VARIANTS = ("linear", "ties")


@register_merge
class Dare(PeftTensorMerge):
    name = "dare"

    param_specs = (
        weights_param(1.0),
        Param(
            "variant",
            "linear",
            {"type": "string", "enum": list(VARIANTS)},
            "combine by weighted sum (linear) or TIES' sign election (ties)",
        ),
        density_param(0.5),
        Param("seed", 0, {"type": "integer"}, "seed of the drop masks (layer i uses seed + i)"),
        SIGN_METHOD,
    )

    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]):
        from peft.utils.merge_utils import dare_linear, dare_ties

        deltas = [concept.delta(layer).float() for concept in concepts]
        device = deltas[0].device
        weight_tensor = torch.tensor(weights, dtype=torch.float32, device=device)
        density = float(self.params["density"])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.params["seed"] + index)
            if self.params["variant"] == "linear":
                return dare_linear(deltas, weight_tensor, density)
            return dare_ties(deltas, weight_tensor, density, majority_sign_method=self.params["majority_sign_method"])
