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

from lorachain.merging.base import Concept, register_merge
from lorachain.merging.ties import PeftTensorMerge
from lorachain.torch_env import torch

VARIANTS = ("linear", "ties")


@register_merge
class Dare(PeftTensorMerge):
    name = "dare"

    @classmethod
    def parameters(cls) -> dict:
        return {**super().parameters(), "variant": "linear", "density": 0.5, "seed": 0, "majority_sign_method": "total"}

    def check_params(self) -> None:
        super().check_params()
        if self.params["variant"] not in VARIANTS:
            raise self.error(f"parameter 'variant' must be one of {VARIANTS}, got {self.params['variant']!r}")
        if isinstance(self.params["seed"], bool) or not isinstance(self.params["seed"], int):
            raise self.error(f"parameter 'seed' must be an integer, got {self.params['seed']!r}")

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
