"""Magnitude-based selection ("light MagMax").

A fresh LoRA is trained on top of W_{t-1}; with tau_{t-1} = W_{t-1} - W0 and delta_t = B_t A_t, each
parameter keeps the entry of larger magnitude, ties going to the new task:
tau_t = where(|delta_t| >= |tau_{t-1}|, delta_t, tau_{t-1}). No threshold, sign election or rescaling.
"""

from lorachain.lazy_torch import torch
from lorachain.methods.base import ContinualMethod, register_method


@register_method
class MagMax(ContinualMethod):
    name = "magmax"

    def fold(self, merged, delta):
        if merged is None:  # tau_0 = 0: every entry of delta_1 wins (ties included)
            return delta.clone()
        return torch.where(delta.abs() >= merged.abs(), delta, merged)
