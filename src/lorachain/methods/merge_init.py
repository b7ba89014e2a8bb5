"""Merge & Initialization: merge each task's LoRA into the weights, start the next from a fresh one.

W_T = W0 + sum_t B_t A_t, each delta trained on top of all earlier merges. The base class already
does exactly this (Gaussian A, B = 0; fold adds the delta).
"""

from lorachain.methods.base import ContinualMethod, register_method


@register_method
class MergeInit(ContinualMethod):
    name = "merge_init"
