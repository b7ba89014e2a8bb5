"""The interface every merge method implements, and the registry that names them.

A merge takes the LoRAs of k independently trained concepts (:class:`Concept`) and returns, for
every targeted layer, the merged dense delta ``W - W0`` in float32. Methods differ only in
:meth:`MergeMethod.merge_layer`; validation (no concepts, incompatible LoRAs, weights) and the
layer loop live here, so every method refuses bad input with the same messages.

Weights (the ``weights`` parameter of every method) are the alpha_i of the merge equations:

* ``"mean"``: alpha_i = 1/k;
* a list of exactly k non-negative numbers, one per concept in the order given;
* a single non-negative number used for every concept, where the method allows it.

Methods whose paper constrains sum_i alpha_i = 1 (weighted averaging, paper Eq. 2 of the BlockLoRA
paper; BlockLoRA, its Eq. 5) set ``weights_sum_to_one`` and refuse lists that do not sum to 1
(tolerance 1e-6) and constants.

Layers are visited in sorted name order; :meth:`MergeMethod.iter_merge` yields one merged layer
at a time so SDXL-size merges (955 M dense parameters over 560 layers, 3.8 GB in float32) need
not hold every layer at once. Parameters are declared once per class (``param_specs``, see
:mod:`lorachain.params`); every merge accepts ``weights`` (:data:`WEIGHTS`). This module imports
torch only on first use (:mod:`lorachain.lazy_torch`): the workflow reads the registry (parameters,
``needs_layer_inputs``) while the Snakefile is parsed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from numbers import Real
from typing import ClassVar

from lorachain.lazy_torch import torch
from lorachain.lora import Concept, LayerAdapter, check_compatible
from lorachain.params import Param, check_values, defaults, with_owner

_REGISTRY: dict[str, type["MergeMethod"]] = {}
WEIGHT_SUM_TOLERANCE = 1e-6


class MergeError(ValueError):
    """A merge that cannot run as asked; the message names the config key, parameter or concept."""


WEIGHTS_SCHEMA = {
    "description": '"mean" (alpha_i = 1/k), a constant alpha for every concept, or one weight per merged concept',
    "oneOf": [
        {"const": "mean"},
        {"type": "number", "minimum": 0},
        {"type": "array", "items": {"type": "number", "minimum": 0}},
    ],
}


def weights_param(default="mean", description: str = "alpha_i of the merge") -> Param:
    """The ``weights`` parameter every merge has (its default differs by method)."""
    return Param("weights", default, WEIGHTS_SCHEMA, description, shared="merge_weights")


class MergeMethod(ABC):
    """Base class of the merges; subclasses implement :meth:`merge_layer` and register."""

    name: ClassVar[str]
    needs_layer_inputs: ClassVar[bool] = False  # the workflow records grams for concepts only when true
    needs_equal_rank: ClassVar[bool] = False
    weights_sum_to_one: ClassVar[bool] = False  # the paper requires sum alpha_i = 1
    requirement: ClassVar[str] = ""  # what the paper requires of the weights, for error messages
    constant_weights: ClassVar[bool] = False  # a constant alpha is accepted even where lists must sum to 1

    param_specs: ClassVar[tuple[Param, ...]] = (weights_param(),)  # the accepted parameters, each declared once

    @classmethod
    def layer_input_recording(cls, params: dict) -> str | None:
        """How the concepts' layer inputs must be recorded for this merge with `params` (a name of
        :func:`lorachain.merging.fusion.recording_name`, part of the gram files' names), or None
        when the merge needs none."""
        return "images" if cls.needs_layer_inputs else None

    def __init__(self, **params):
        self.config_key: str | None = None
        values, problems = check_values(self.param_specs, params)
        unknown = [problem for problem in problems if problem.startswith("has no")]
        if unknown:
            raise MergeError(with_owner(f"merge {self.name!r}", unknown[0]))
        self.params = values
        self._check_weights_spec(self.params["weights"])  # its own messages (sum to 1, count) first
        if problems:
            raise self.error("; ".join(problems))
        self.check_params()

    @classmethod
    def parameters(cls) -> dict:
        """Accepted parameters and their defaults."""
        return defaults(cls.param_specs)

    @classmethod
    def load_dependencies(cls) -> None:
        """Import what merge_layer imports lazily, so that timing a merge does not time imports."""

    def check_params(self) -> None:
        """Checks across parameters that a per-parameter schema cannot make (raise :meth:`error`)."""

    def error(self, message: str) -> MergeError:
        where = f"config key {self.config_key}: " if self.config_key else ""
        return MergeError(f"{where}merge {self.name!r}: {message}")

    # ------------------------------------------------------------------ weights

    def _check_weights_spec(self, spec) -> None:
        if isinstance(spec, str):
            if spec != "mean":
                raise self.error(f"parameter 'weights' must be 'mean', a number or a list of numbers, not {spec!r}")
            return
        if isinstance(spec, Real) and not isinstance(spec, bool):
            if self.weights_sum_to_one and not self.constant_weights:
                raise self.error(
                    f"parameter 'weights' is the constant {spec}, "
                    f"but {self.requirement or 'this method requires weights that sum to 1'}; "
                    "use 'mean' or a list of one weight per concept that sums to 1"
                )
            if not math.isfinite(spec) or spec < 0:
                raise self.error(f"parameter 'weights' must be non-negative, got {spec}")
            return
        if isinstance(spec, (list, tuple)):
            if not spec or not all(isinstance(w, Real) and not isinstance(w, bool) for w in spec):
                raise self.error(f"parameter 'weights' must be a non-empty list of numbers, got {spec!r}")
            if any(not math.isfinite(w) or w < 0 for w in spec):
                raise self.error(f"parameter 'weights' must be non-negative, got {list(spec)}")
            if self.weights_sum_to_one and abs(sum(spec) - 1.0) > WEIGHT_SUM_TOLERANCE:
                raise self.error(
                    f"parameter 'weights' sums to {sum(spec):.6g}, "
                    f"but {self.requirement or 'this method requires weights that sum to 1'}"
                )
            return
        raise self.error(f"parameter 'weights' must be 'mean', a number or a list of numbers, not {spec!r}")

    def resolve_weights(self, count: int) -> list[float]:
        """The alpha_i for `count` concepts."""
        spec = self.params["weights"]
        if spec == "mean":
            return [1.0 / count] * count
        if isinstance(spec, Real):
            return [float(spec)] * count
        if len(spec) != count:
            raise self.error(
                f"parameter 'weights' has {len(spec)} value(s) but {count} concept(s) are merged; "
                "give one weight per concept"
            )
        return [float(w) for w in spec]

    # ------------------------------------------------------------------ merging

    def validate(self, concepts: Sequence[Concept]) -> list[float]:
        """Check the concepts and return the resolved weights; raises before any layer is merged."""
        if len(concepts) == 0:
            raise self.error("no concepts to merge (got an empty list)")
        check_compatible(list(concepts), need_equal_rank=self.needs_equal_rank)
        return self.resolve_weights(len(concepts))

    def prepare(self, concepts: Sequence[Concept], weights: list[float]) -> None:
        """Checks that need the concepts' data (called once before the first layer)."""

    def iter_merge(self, concepts: Sequence[Concept]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (layer, merged delta W - W0 in float32) in sorted layer order."""
        weights = self.validate(concepts)
        self.prepare(concepts, weights)
        for index, layer in enumerate(sorted(concepts[0].adapters)):
            yield layer, self.merge_layer(layer, index, concepts, weights).to(torch.float32)

    def merge(self, concepts: Sequence[Concept]) -> dict[str, torch.Tensor]:
        """layer -> merged dense delta (W - W0), float32."""
        return dict(self.iter_merge(concepts))

    def low_rank_terms(
        self, layer: str, concepts: Sequence[Concept], weights: list[float]
    ) -> list[tuple[float, LayerAdapter]] | None:
        """The merged delta of `layer` as the exact weighted sum of the concepts' low-rank products,
        sum_i c_i scale_i B_i A_i (after the same checks as :meth:`merge_layer`), or None where the
        merge is not such a sum (an exporter then re-factorises the dense delta)."""
        return None

    @abstractmethod
    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]) -> torch.Tensor:
        """The merged delta of one layer; `index` is the layer's position in sorted order."""


def register_merge(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"merge name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def merge_names() -> list[str]:
    return sorted(_REGISTRY)


def merge_class(name: str, *, key: str = "merges") -> type[MergeMethod]:
    """The registered class (for class attributes such as ``needs_layer_inputs``)."""
    if name not in _REGISTRY:
        raise MergeError(
            f"config key {key}: unknown merge method {name!r}; known merge methods: {', '.join(merge_names())}"
        )
    return _REGISTRY[name]


def make_merge(name: str, params: dict | None = None, *, key: str = "merges") -> MergeMethod:
    """Instantiate a registered merge; errors name the config key that holds it."""
    cls = merge_class(name, key=key)
    try:
        method = cls(**(params or {}))
    except MergeError as error:
        raise MergeError(f"config key {key}: {error}") from None
    method.config_key = key
    return method
