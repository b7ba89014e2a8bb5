"""The factors an export writes: exact concatenation of low-rank terms, or an SVD re-factorisation.

A state or merge that its method declares as a weighted sum of low-rank terms
(:meth:`lorachain.methods.ContinualMethod.folded_terms`, :meth:`lorachain.methods.MergeMethod.low_rank_terms`),
sum_i c_i s_i B_i A_i, is written exactly as one LoRA of rank sum_i r_i: B = [c_1 s_1 B_1 | ... ],
A = [A_1; ...] (the scales folded into B, so the file's scale is 1). Any other delta (MagMax,
TIES, DARE, gradient fusion, a plugin's own fold) is re-factorised per layer by a truncated SVD at
a fixed rank or at the smallest rank keeping a fraction of the delta's energy (sum of squared
singular values); the relative Frobenius error ||dW - B A||_F / ||dW||_F is recorded per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorachain.lora import LayerAdapter
from lorachain.torch_env import torch


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the file, flag or config key."""


@dataclass
class ExportedLayer:
    """One layer as written: delta ~= B @ A (scale 1); `residual` = ||dW - B A||_F (0 when exact)."""

    A: torch.Tensor  # (rank, in_features)
    B: torch.Tensor  # (out_features, rank)
    norm: float  # ||dW||_F (0 where exact: not computed)
    residual: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def relative_error(self) -> float:
        return self.residual / self.norm if self.norm > 0 else 0.0


@dataclass(frozen=True)
class SvdSettings:
    """How a delta that is not a sum of low-rank terms is re-factorised: at `rank` (every layer),
    or at the smallest rank whose singular values keep `energy` of the layer's sum of squares."""

    rank: int | None = None
    energy: float | None = 0.99
    flags: str = "--rank / --energy"  # what the user set them with, for error messages

    def __post_init__(self):
        if self.rank is not None and self.rank < 1:
            raise ExportError(f"{self.flags}: an SVD rank must be >= 1, got {self.rank}")
        if self.rank is None and (self.energy is None or not 0 < self.energy <= 1):
            raise ExportError(f"{self.flags}: give an SVD rank >= 1 or an energy in (0, 1], got {self.energy}")

    def describe(self) -> dict:
        return {"rank": self.rank} if self.rank is not None else {"energy": self.energy}

    def layer_rank(self, layer: str, shape: tuple[int, int], singular: torch.Tensor) -> int:
        largest = min(shape)
        if self.rank is not None:
            if self.rank > largest:
                raise ExportError(
                    f"{self.flags}: SVD rank {self.rank} is larger than layer {layer!r} allows "
                    f"(shape {tuple(shape)}: at most min(out, in) = {largest}); give a rank <= {largest} "
                    "or an energy threshold instead"
                )
            return self.rank
        energy = singular.double() ** 2
        total = float(energy.sum())
        if total == 0:
            return 1
        kept = torch.cumsum(energy, 0) / total
        return min(int(torch.searchsorted(kept, torch.tensor(self.energy - 1e-12, dtype=kept.dtype))) + 1, largest)


def concatenated(terms: list[tuple[float, LayerAdapter]]) -> ExportedLayer:
    """sum_i c_i s_i B_i A_i as one pair of factors (terms with c_i = 0 left out), exactly."""
    kept = [(float(c), adapter) for c, adapter in terms if c != 0]
    if not kept:
        raise ExportError("a layer with no nonzero term")  # callers leave such layers out
    B = torch.cat([c * adapter.scale * adapter.B.float() for c, adapter in kept], dim=1)
    A = torch.cat([adapter.A.float() for _, adapter in kept], dim=0)
    # exact: no residual, so the delta's norm (an out x in product to form) is not needed
    return ExportedLayer(A=A.contiguous(), B=B.contiguous(), norm=0.0, residual=0.0)


def svd_factors(layer: str, delta: torch.Tensor, settings: SvdSettings) -> ExportedLayer:
    """The truncated SVD of one layer's delta, through the eigendecomposition of its Gram matrix on
    the narrower side in float64 (on a CPU several times faster than torch.linalg.svd of the delta,
    the same leading singular vectors): B A = U_k U_k^T dW (rows) or dW V_k V_k^T (columns), the
    orthonormal factor on the narrow side. The residual is measured on the float32 factors written."""
    dense = delta.detach().to("cpu", torch.float64)
    columns = dense.shape[0] > dense.shape[1]  # project onto the leading right singular vectors
    narrow = dense.T if columns else dense
    eigenvalues, vectors = torch.linalg.eigh(narrow @ narrow.T)
    singular = eigenvalues.flip(0).clamp_min(0).sqrt()
    rank = settings.layer_rank(layer, tuple(dense.shape), singular)
    basis = vectors.flip(1)[:, :rank]
    if columns:
        B, A = dense @ basis, basis.T
    else:
        B, A = basis, basis.T @ dense
    B, A = B.to(torch.float32).contiguous(), A.to(torch.float32).contiguous()
    residual = float(torch.linalg.norm(dense - B.double() @ A.double()))
    return ExportedLayer(A=A, B=B, norm=float(torch.linalg.norm(dense)), residual=residual)


def overall_error(layers: dict[str, ExportedLayer]) -> float:
    """||dW - B A||_F / ||dW||_F over all layers together."""
    norm = math.sqrt(sum(layer.norm**2 for layer in layers.values()))
    residual = math.sqrt(sum(layer.residual**2 for layer in layers.values()))
    return residual / norm if norm > 0 else 0.0
