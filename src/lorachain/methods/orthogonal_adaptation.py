"""Orthogonal Adaptation (Po et al., CVPR 2024) as a training method.

The down-projection A of concept slot s is frozen to r orthonormal rows of a random orthogonal
matrix shared by every concept (one per input width, seeded by ``basis_seed``): the columns
[s*r, (s+1)*r) of the basis (:func:`lorachain.merging.orthogonal_adaptation.slot_down_projection`),
so different slots have exactly orthogonal down-projections. Only B trains, starting at zero. The
merge (its own registry entry) sums the deltas. At most in_features // rank slots fit a layer.
"""

from lorachain.methods.base import ContinualMethod, LayerAdapter, MethodError, register_method
from lorachain.torch_env import torch


@register_method
class OrthogonalAdaptation(ContinualMethod):
    name = "orthogonal_adaptation"
    freeze_down_projection = True

    @classmethod
    def parameters(cls):
        return {"basis_seed": 0}

    def init_adapter(self, ctx):
        from lorachain.merging.orthogonal_adaptation import slot_down_projection  # lazily: lorachain.merging imports this package

        try:
            A = slot_down_projection(ctx.in_features, ctx.rank, ctx.slot, self.params["basis_seed"])
        except ValueError as error:
            raise MethodError(f"method 'orthogonal_adaptation', layer {ctx.layer}: {error}") from None
        return LayerAdapter(A=A, B=torch.zeros(ctx.out_features, ctx.rank), scale=ctx.scale)
