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
not hold every layer at once. This module stays import-light (torch only) because the workflow
imports it to read the registry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import ClassVar

from lorachain.merging.lora_files import check_compatible
from lorachain.methods.base import LayerAdapter
from lorachain.torch_env import torch

_REGISTRY: dict[str, type["MergeMethod"]] = {}
WEIGHT_SUM_TOLERANCE = 1e-6


class MergeError(ValueError):
    """A merge that cannot run as asked; the message names the config key, parameter or concept."""


@dataclass
class Concept:
    """One concept's LoRA as the merge sees it."""

    name: str  # file path or concept id; used in error messages
    adapters: dict[str, LayerAdapter]
    slot: int | None = None  # concept slot (BlockLoRA block / orthogonal-adaptation basis block), if known
    # layer -> (X^T X summed over the recorded inputs of that layer, number of input rows); gradient fusion only
    grams: dict[str, tuple[torch.Tensor, int]] | None = None

    def delta(self, layer: str) -> torch.Tensor:
        return self.adapters[layer].delta()


def linear_combination(adapters: Sequence[LayerAdapter], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_i c_i * scale_i * B_i @ A_i, exactly (no cross terms), as one matmul of the factors
    concatenated along the rank: [c_1 s_1 B_1 | ... | c_k s_k B_k] @ [A_1; ...; A_k]."""
    B = torch.cat([float(c) * adapter.scale * adapter.B.float() for adapter, c in zip(adapters, coefficients)], dim=1)
    A = torch.cat([adapter.A.float() for adapter in adapters], dim=0)
    return B @ A


class MergeMethod(ABC):
    """Base class of the merges; subclasses implement :meth:`merge_layer` and register."""

    name: ClassVar[str]
    needs_layer_inputs: ClassVar[bool] = False  # the workflow records grams for concepts only when true
    needs_equal_rank: ClassVar[bool] = False
    weights_sum_to_one: ClassVar[bool] = False  # the paper requires sum alpha_i = 1
    default_weights: ClassVar[object] = "mean"
    requirement: ClassVar[str] = ""  # what the paper requires of the weights, for error messages

    def __init__(self, **params):
        self.config_key: str | None = None
        unknown = set(params) - set(self.parameters())
        if unknown:
            raise MergeError(
                f"merge {self.name!r} has no parameter(s) {sorted(unknown)}; it accepts {sorted(self.parameters())}"
            )
        self.params = {**self.parameters(), **params}
        self._check_weights_spec(self.params["weights"])
        self.check_params()

    @classmethod
    def parameters(cls) -> dict:
        """Accepted parameters and their defaults."""
        return {"weights": cls.default_weights}

    @classmethod
    def load_dependencies(cls) -> None:
        """Import what merge_layer imports lazily, so that timing a merge does not time imports."""

    def check_params(self) -> None:
        """Validate the method's own parameters (raise :meth:`error`)."""

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
            if self.weights_sum_to_one:
                raise self.error(
                    f"parameter 'weights' is the constant {spec}, but {self.requirement or 'this method requires weights that sum to 1'}; "
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
                    f"parameter 'weights' sums to {sum(spec):.6g}, but {self.requirement or 'this method requires weights that sum to 1'}"
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
            raise self.error(f"parameter 'weights' has {len(spec)} value(s) but {count} concept(s) are merged; give one weight per concept")
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

    @abstractmethod
    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]) -> torch.Tensor:
        """The merged delta of one layer; `index` is the layer's position in sorted order."""


def register_merge(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"merge name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_merges() -> None:
    # The built-in methods register on import; importing them here lets `lorachain.merging.base`
    # alone answer registry questions (the Snakefile imports only this module).
    import lorachain.merging  # noqa: F401


def merge_names() -> list[str]:
    _load_builtin_merges()
    return sorted(_REGISTRY)


def merge_class(name: str, *, key: str = "merges") -> type[MergeMethod]:
    """The registered class (for class attributes such as ``needs_layer_inputs``)."""
    _load_builtin_merges()
    if name not in _REGISTRY:
        raise MergeError(f"config key {key}: unknown merge method {name!r}; known merge methods: {', '.join(merge_names())}")
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
