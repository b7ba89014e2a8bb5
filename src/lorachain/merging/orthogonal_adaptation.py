"""Orthogonal Adaptation (Po et al., CVPR 2024): orthogonal down-projections, merge by summation.

Training side (called by the trainer): the down-projection A_i of concept i is frozen to r rows of
a random orthogonal matrix O shared by all concepts (one O per input width, from a fixed seed); only
the up-projection B_i is trained, starting at 0. With a known concept slot s the rows are the
columns [s*r, (s+1)*r) of O (:func:`slot_down_projection`), so A_i A_j^T = 0 exactly for i != j
and at most in_features // r concepts fit in one layer. The rows are unit vectors; what scale the
trainer gives them is its choice.

Merge side: W = W0 + sum_i lambda_i scale_i B_i A_i, computed exactly. ``weights`` is lambda:
default the constant 0.6 (the paper's lambda), any non-negative constant or list is accepted; the
weights need not sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from lorachain.merging.base import Concept, MergeMethod, linear_combination, register_merge
from lorachain.torch_env import torch


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
    return basis[:, slot * rank:(slot + 1) * rank].T.to(torch.float32).contiguous()


@register_merge
class OrthogonalAdaptation(MergeMethod):
    name = "orthogonal_adaptation"
    default_weights = 0.6

    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]):
        return linear_combination([concept.adapters[layer] for concept in concepts], weights)

