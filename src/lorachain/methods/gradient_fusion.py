"""Gradient fusion (Mix-of-Show) as a merge method: the closed-form least-squares fusion of
:func:`lorachain.merging.fusion.fuse_layer`, per layer, from each concept's recorded input Grams.

Parameters: ``weights`` (w_i of the per-concept loss terms; default "mean"; with the relative
ridge only their ratios matter), ``ridge`` (default 1e-6, relative to the mean diagonal of
sum_i w_i G_i), ``prior`` ("mean": unexcited input directions keep the weighted average of the
deltas and a single concept is reproduced exactly; "base": they keep W0), ``rcond`` (eigenvalue
cut-off of the ridge-0 pseudo-inverse, relative to the largest). See :mod:`lorachain.merging.fusion`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorachain.lora import Concept
from lorachain.merging.fusion import DEFAULT_RCOND, DEFAULT_RIDGE, PRIORS, fuse_layer
from lorachain.methods.merge_base import MergeMethod, register_merge, weights_param
from lorachain.params import Param


@register_merge
class GradientFusion(MergeMethod):
    name = "gradient_fusion"
    needs_layer_inputs = True
    param_specs = (
        weights_param("mean", "w_i of the per-concept loss terms"),
        Param(
            "ridge",
            DEFAULT_RIDGE,
            {"type": "number", "minimum": 0},
            "ridge, relative to the mean diagonal of sum_i w_i G_i",
        ),
        Param(
            "prior",
            "mean",
            {"type": "string", "enum": list(PRIORS)},
            "what unexcited input directions keep: the weighted average of the deltas (mean) or W0 (base)",
        ),
        Param(
            "rcond",
            DEFAULT_RCOND,
            {"type": "number", "minimum": 0},
            "eigenvalue cut-off of the ridge-0 pseudo-inverse, relative to the largest",
        ),
    )

    def prepare(self, concepts: Sequence[Concept], weights: list[float]) -> None:
        if sum(weights) <= 0:
            raise self.error("parameter 'weights' are all zero; at least one concept must carry weight")
        for concept in concepts:
            if concept.grams is None:
                raise self.error(
                    f"concept {concept.name!r} has no recorded layer inputs (grams); "
                    "gradient fusion needs them for every layer"
                )
            for layer in sorted(concept.adapters):
                if layer not in concept.grams:
                    raise self.error(f"concept {concept.name!r} has no recorded inputs (gram) for layer {layer!r}")
                G, rows = concept.grams[layer]
                width = concept.adapters[layer].A.shape[1]
                if tuple(G.shape) != (width, width):
                    raise self.error(
                        f"concept {concept.name!r}: the gram of layer {layer!r} is {tuple(G.shape)}, "
                        f"the layer's input width is {width} (expected ({width}, {width}))"
                    )
                if rows <= 0:
                    raise self.error(f"concept {concept.name!r}: layer {layer!r} recorded 0 input rows")

    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]):
        return fuse_layer(
            [concept.adapters[layer] for concept in concepts],
            [concept.grams[layer][0] for concept in concepts],
            ridge=float(self.params["ridge"]),
            weights=weights,
            prior=self.params["prior"],
            rcond=float(self.params["rcond"]),
        )
