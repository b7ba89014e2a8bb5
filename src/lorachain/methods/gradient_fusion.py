"""Gradient fusion (Mix-of-Show) as a merge method: the closed-form least-squares fusion of
:func:`lorachain.merging.fusion.fuse_layer`, per layer, from each concept's recorded input Grams.

Parameters: ``weights`` (w_i of the per-concept loss terms; default "mean"; with the relative
ridge only their ratios matter), ``ridge`` (default 1e-6, relative to the mean diagonal of
sum_i w_i G_i), ``prior`` ("mean": unexcited input directions keep the weighted average of the
deltas and a single concept is reproduced exactly; "base": they keep W0), ``rcond`` (eigenvalue
cut-off of the ridge-0 pseudo-inverse, relative to the largest), and how the concepts' layer
inputs are recorded: ``inputs`` ("images": the concept's training images, noised at evenly spaced
levels, this project's default; "sampling": the steps of a sampling trajectory of the concept's
prompt, as Mix-of-Show records them) and ``cross_attention_rows`` ("all" token features, or only the
"concept"'s own tokens in the cross-attention K/V layers). Mix-of-Show as published is
``prior: base, inputs: sampling, cross_attention_rows: concept``. See :mod:`lorachain.merging.fusion`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorachain.lora import Concept
from lorachain.merging.fusion import (
    CROSS_ATTENTION_ROWS,
    DEFAULT_RCOND,
    DEFAULT_RIDGE,
    PRIORS,
    RECORDING_SOURCES,
    fuse_layer,
    recording_name,
)
from lorachain.methods.merge_base import MergeMethod, register_merge, weights_param
from lorachain.params import Param, defaults


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
        Param(
            "inputs",
            "images",
            {"type": "string", "enum": list(RECORDING_SOURCES)},
            "what each concept's layer inputs are recorded on: its noised training images (images) or "
            "a sampling trajectory of its prompt (sampling, Mix-of-Show)",
        ),
        Param(
            "cross_attention_rows",
            "all",
            {"type": "string", "enum": list(CROSS_ATTENTION_ROWS)},
            "the token rows of the cross-attention K/V inputs that enter their Grams: all, or the concept's own",
        ),
    )

    @classmethod
    def layer_input_recording(cls, params: dict) -> str:
        values = {**defaults(cls.param_specs), **params}
        return recording_name(values["inputs"], values["cross_attention_rows"])

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
