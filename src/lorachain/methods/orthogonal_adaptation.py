"""Orthogonal Adaptation (Po et al., CVPR 2024): orthogonal down-projections, merge by summation;
training side, merge side and the basis they share.

Training side (:class:`OrthogonalAdaptation`): the down-projection A_i of concept slot s is frozen
to r rows of a random orthogonal matrix O shared by all concepts (one O per input width, seeded by
``basis_seed``). ``columns: coordinated``: the columns [s*r, (s+1)*r) of O
(:func:`slot_down_projection`), so A_i A_j^T = 0 exactly for i != j and at most in_features // r
concepts fit in one layer (:func:`max_slots`). ``columns: random``: r columns of O drawn at random
per slot (:func:`random_down_projection`), the original paper's uncoordinated choice: any number of
concepts, approximately orthogonal. ``columns: auto`` (default): coordinated on every layer the
slot fits, random beyond it (:func:`auto_down_projection`). Only the up-projection B_i trains,
starting at 0. The rows are unit vectors; what scale the trainer gives them is its choice.

Merge side (:class:`OrthogonalAdaptationMerge`): W = W0 + sum_i lambda_i scale_i B_i A_i, computed
exactly. ``weights`` is lambda: default the constant 0.6 (the paper's lambda), any non-negative
constant or list is accepted; the weights need not sum to 1. See docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from lorachain.lazy_torch import torch
from lorachain.lora import Concept, LayerAdapter, linear_combination
from lorachain.methods.base import ContinualMethod, MethodError, register_method
from lorachain.methods.merge_base import MergeMethod, register_merge, weights_param
from lorachain.params import Param


@lru_cache(maxsize=16)
def _orthogonal_basis(in_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(in_features, in_features, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # QR is unique only up to the signs of R's diagonal; fixing them makes O a deterministic
    # function of the Gaussian draw (Haar-distributed, as in Mezzadri 2007).
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def orthogonal_basis(in_features: int, seed: int) -> torch.Tensor:
    """(in_features, in_features) random orthogonal matrix, float64, deterministic for (in_features, seed)."""
    if in_features < 1:
        raise ValueError(f"orthogonal_basis: in_features must be >= 1, got {in_features}")
    return _orthogonal_basis(int(in_features), int(seed)).clone()  # a copy: callers may modify it


def max_slots(in_features: int, rank: int) -> int:
    return in_features // rank


def slot_down_projection(in_features: int, rank: int, slot: int, seed: int) -> torch.Tensor:
    """(rank, in_features) float32 down-projection of concept slot `slot`: the columns
    [slot*rank, (slot+1)*rank) of :func:`orthogonal_basis` as rows (orthonormal)."""
    if rank < 1:
        raise ValueError(f"slot_down_projection: rank must be >= 1, got {rank}")
    if slot < 0 or (slot + 1) * rank > in_features:
        raise ValueError(
            f"slot_down_projection: slot {slot} with rank {rank} needs columns [{slot * rank}, {(slot + 1) * rank}) "
            f"of the orthogonal basis, but in_features is {in_features}: at most {max_slots(in_features, rank)} "
            f"concept slots (0..{max_slots(in_features, rank) - 1}) fit at this rank"
        )
    basis = _orthogonal_basis(int(in_features), int(seed))
    return basis[:, slot * rank : (slot + 1) * rank].T.to(torch.float32).contiguous()


def random_down_projection(in_features: int, rank: int, slot: int, seed: int) -> torch.Tensor:
    """(rank, in_features) float32 down-projection of concept slot `slot` in the original paper's
    uncoordinated way: `rank` columns of :func:`orthogonal_basis` drawn at random (without
    replacement, from a generator seeded by the basis seed and the slot), so any number of concepts
    fit and two concepts share a column only by chance (expected rank^2 / in_features shared
    columns): approximately, not exactly, orthogonal."""
    if not 1 <= rank <= in_features:
        raise ValueError(f"random_down_projection: rank {rank} must be in 1..in_features ({in_features})")
    if slot < 0:
        raise ValueError(f"random_down_projection: slot must be >= 0, got {slot}")
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(slot) + 1)
    columns = torch.randperm(in_features, generator=generator)[:rank].sort().values
    basis = _orthogonal_basis(int(in_features), int(seed))
    return basis[:, columns].T.to(torch.float32).contiguous()


def auto_down_projection(in_features: int, rank: int, slot: int, seed: int) -> torch.Tensor:
    """Coordinated columns where the slot fits the layer ((slot + 1) * rank <= in_features), the
    original paper's random columns beyond: exact orthogonality among the first in_features // rank
    concepts of every layer, approximate for the rest."""
    if rank >= 1 and 0 <= slot < max_slots(in_features, rank):
        return slot_down_projection(in_features, rank, slot, seed)
    return random_down_projection(in_features, rank, slot, seed)


DOWN_PROJECTIONS = {
    "auto": auto_down_projection,
    "coordinated": slot_down_projection,
    "random": random_down_projection,
}


@register_method
class OrthogonalAdaptation(ContinualMethod):
    """The training side: A frozen to the slot's columns of the orthogonal basis, only B trains."""

    name = "orthogonal_adaptation"
    freeze_down_projection = True
    param_specs = (
        Param("basis_seed", 0, {"type": "integer"}, "seed of the orthogonal basis shared by every concept"),
        Param(
            "columns",
            "auto",
            {"type": "string", "enum": list(DOWN_PROJECTIONS)},
            "coordinated: slot s owns columns [s*r, (s+1)*r) (exactly orthogonal, at most in_features // r "
            "concepts); random: r random columns per slot (the original paper; any number of concepts); "
            "auto: coordinated where the slot fits the layer, random beyond",
        ),
    )

    def check_widths(self, slots, rank, narrowest, key):
        if self.params["columns"] == "coordinated" and slots > max_slots(narrowest, rank):
            raise MethodError(
                f"method 'orthogonal_adaptation': {slots} concepts at rank {rank} need {slots * rank} coordinated "
                f"columns, but the narrowest targeted layer has {narrowest} inputs (at most "
                f"{max_slots(narrowest, rank)} concepts); set {key}.columns: auto or random (the original "
                "paper's uncoordinated columns), or lower training.rank"
            )

    def init_adapter(self, ctx):
        down_projection = DOWN_PROJECTIONS[self.params["columns"]]
        try:
            A = down_projection(ctx.in_features, ctx.rank, ctx.slot, self.params["basis_seed"])
        except ValueError as error:
            fix = " (or set columns: auto or random, the original paper's uncoordinated columns)"
            raise MethodError(f"method 'orthogonal_adaptation', layer {ctx.layer}: {error}{fix}") from None
        return LayerAdapter(A=A, B=torch.zeros(ctx.out_features, ctx.rank), scale=ctx.scale)


@register_merge
class OrthogonalAdaptationMerge(MergeMethod):
    """The merge: the exact weighted sum of the deltas."""

    name = "orthogonal_adaptation"
    param_specs = (weights_param(0.6, "lambda_i (the paper: 0.6); need not sum to 1"),)

    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]):
        return linear_combination([concept.adapters[layer] for concept in concepts], weights)

    def low_rank_terms(self, layer, concepts, weights):
        return [(weight, concept.adapters[layer]) for concept, weight in zip(concepts, weights)]
