"""Merge & Orthogonal Initialization.

As merge_init (the trained adapter is added into the weights), but the new task's A is initialised
orthogonal to what came before; B starts at 0. Two variants:

``columnwise`` (default; the paper's Figure 1, "SVD column orthogonalization"): for every input
column j, the new A[:, j] is the last right singular vector of the 1 x r matrix A_prev[:, j]^T, a
unit vector in the null space of the previous task's column, so <A_new[:, j], A_prev[:, j]> = 0.
Needs rank >= 2. The released code instead sums all factors ((sum B)(sum A), which adds untrained
cross terms B_i A_j) and orthogonalises against sum A; we follow the figure (see docs/methods.md).

``rowspace`` (stronger, offered as an option): the rows of the new A are orthonormal and orthogonal
to the row space of every previous task's A, so the subspaces are truly orthogonal. That row space
is read off the merged weights alone (the right singular vectors of W_{t-1} - W0, whose rank is at
most (t-1) r), so the variant stays in the strict regime. Where rank does not allow ((t-1) r + r >
in_features), the new rows avoid the in_features - r strongest merged directions.

Scale: unit-norm vectors are about sqrt(r) times larger than peft's Gaussian init (A ~ N(0, 1/r^2),
column norm about 1/sqrt(r)). ``init_scale: gaussian`` (default) keeps the Gaussian's expected
Frobenius norm n/r^2 * r = n/r: columns of norm 1/sqrt(r) (columnwise) or rows of norm sqrt(n)/r
(rowspace). ``init_scale: unit`` uses unit vectors as the figure draws them.

The SVDs run in float64 on the CPU so that the initialisation is reproducible across devices.
"""

from __future__ import annotations

import math

from lorachain.lazy_torch import torch
from lorachain.lora import LayerAdapter
from lorachain.methods.base import ContinualMethod, InitContext, MethodError, gaussian_adapter, register_method
from lorachain.params import Param

VARIANTS = ("columnwise", "rowspace")
INIT_SCALES = ("gaussian", "unit")


def columnwise_null_vectors(previous_A: torch.Tensor) -> torch.Tensor:
    """(r, n) -> (r, n) whose column j is the last right singular vector of previous_A[:, j]^T."""
    columns = previous_A.detach().to("cpu", torch.float64).T.unsqueeze(1)  # (n, 1, r)
    _, _, vh = torch.linalg.svd(columns, full_matrices=True)  # vh: (n, r, r)
    return vh[:, -1, :].T.contiguous()


def rows_orthogonal_to(merged: torch.Tensor, rank: int, tasks_done: int, generator: torch.Generator) -> torch.Tensor:
    """(rank, n) orthonormal rows, orthogonal to the top right singular vectors of `merged`."""
    n = merged.shape[1]
    avoided = min(tasks_done * rank, n - rank)
    gaussian = torch.randn(rank, n, generator=generator, dtype=torch.float32).to(torch.float64)
    if avoided > 0:
        _, _, vh = torch.linalg.svd(merged.detach().to("cpu", torch.float64), full_matrices=False)
        basis = vh[:avoided]  # (avoided, n), orthonormal rows
        gaussian = gaussian - (gaussian @ basis.T) @ basis
    q, r = torch.linalg.qr(gaussian.T)  # orthonormal columns spanning the projected rows
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=torch.float64))
    return q.T.contiguous()


@register_method
class OrthoInit(ContinualMethod):
    name = "ortho_init"

    param_specs = (
        Param(
            "variant",
            "columnwise",
            {"type": "string", "enum": list(VARIANTS)},
            "columnwise: null space of each column of the previous A; rowspace: orthogonal to the merged row space",
        ),
        Param(
            "init_scale",
            "gaussian",
            {"type": "string", "enum": list(INIT_SCALES)},
            "gaussian: the Gaussian init's expected norm; unit: unit vectors",
        ),
    )

    def init_adapter(self, ctx: InitContext) -> LayerAdapter:
        gaussian_scale = self.params["init_scale"] == "gaussian"
        if self.params["variant"] == "columnwise":
            if ctx.previous is None:
                return gaussian_adapter(ctx)
            if ctx.rank < 2:
                raise MethodError("ortho_init (columnwise) needs training.rank >= 2: a 1 x 1 column has no null space")
            A = columnwise_null_vectors(ctx.previous.A)
            if gaussian_scale:
                A = A / math.sqrt(ctx.rank)
        else:
            if ctx.merged is None:
                return gaussian_adapter(ctx)
            A = rows_orthogonal_to(ctx.merged, ctx.rank, ctx.tasks_done, ctx.generator)
            if gaussian_scale:
                A = A * (math.sqrt(ctx.in_features) / ctx.rank)
        return LayerAdapter(A=A.to(torch.float32), B=torch.zeros(ctx.out_features, ctx.rank), scale=ctx.scale)
