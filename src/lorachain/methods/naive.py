"""Naive continual fine-tuning: one LoRA trained on and on; the model after task t is W0 + B_t A_t."""

from lorachain.lora import LayerAdapter
from lorachain.methods.base import ContinualMethod, InitContext, gaussian_adapter, register_method


@register_method
class Naive(ContinualMethod):
    name = "naive"
    adapter_stays_live = True  # passed on: the single adapter, never merged

    def init_adapter(self, ctx: InitContext) -> LayerAdapter:
        if ctx.previous is None:
            return gaussian_adapter(ctx)
        return LayerAdapter(A=ctx.previous.A.clone(), B=ctx.previous.B.clone(), scale=ctx.scale)

    def fold(self, merged, delta):
        return merged  # nothing is merged: the trained adapter itself carries the model

    def folded_terms(self, adapters):
        return []  # nothing is merged; the live adapter is the whole model
