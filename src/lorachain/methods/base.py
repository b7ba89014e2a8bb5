"""The interface every continual method implements, and the registry that names them.

A method decides two things and nothing else:

* how the adapter of a new task is initialised (:meth:`ContinualMethod.init_adapter`), seeing only
  what the strict regime allows: the merged weights left by the previous task (as the dense delta
  ``merged = W_{t-1} - W0`` of each targeted layer) and the previous task's adapter;
* how the state after the task is formed (:meth:`ContinualMethod.fold`): the new merged delta from
  the old one and the trained adapter's delta ``B_t A_t * alpha / r``, and whether the trained
  adapter stays live on top of the merged weights (``adapter_stays_live``) instead of being merged.
* what it changes during training, as capabilities the trainer applies to every method alike:
  a row mask on the up-projection (:meth:`ContinualMethod.row_mask`: rows outside it stay exactly
  zero), a frozen down-projection (``freeze_down_projection``), and randomized output erasure
  (:meth:`ContinualMethod.erasure_rate`: a fresh Bernoulli mask over the LoRA branch's output
  features at every training forward pass, never at inference).

The trainer, the state store and the workflow call these hooks and never branch on a method's name.
Adding a method is one module with a subclass decorated by :func:`register_method` that declares
its parameters once (``params``: :class:`lorachain.params.Param`); defaults, the checks made when it
is built and its block of the config schema (:mod:`lorachain.methods.registry`) come from there.
A module outside lorachain can do the same and be named under the config's ``plugins``.

Every method also accepts the parameters in :data:`COMMON_PARAMS`, declared once here: ``embeddings``
(embedding-weight tuning: new concept tokens whose input embeddings train with the LoRA, see
:class:`EmbeddingSettings` and docs/methods.md). A common parameter whose value is its default (off)
is left out of ``params``, so a method block without it records exactly what it recorded before
the parameter existed (manifests, checkpoint fingerprints and the chain check stay byte-identical).
"""

from __future__ import annotations

from abc import ABC
from dataclasses import asdict, dataclass
from typing import ClassVar

from lorachain.lazy_torch import torch
from lorachain.lora import LayerAdapter
from lorachain.params import Param, check_values, defaults, with_owner

_REGISTRY: dict[str, type["ContinualMethod"]] = {}
# The trainer's options a method may refuse (lorachain.training.config.TrainingConfig.used_options:
# a warm-up counts as lr_scheduler, a regex target_modules as target_modules). Spelled here because
# methods sit below training in the import order; a test holds the two lists equal.
TRAINING_OPTION_NAMES = (
    "lr_scheduler",
    "gradient_accumulation_steps",
    "random_flip",
    "lora_dropout",
    "use_rslora",
    "prior_preservation",
    "target_modules",
)


class MethodError(ValueError):
    """A method name or parameter that cannot be used; the message names the config key."""


@dataclass
class InitContext:
    """What a method may look at when it initialises the adapter of one layer for task t."""

    layer: str
    out_features: int
    in_features: int
    rank: int
    scale: float
    tasks_done: int  # t - 1: how many tasks are folded into `merged`
    merged: torch.Tensor | None  # W_{t-1} - W0 of this layer (None: nothing merged yet)
    previous: LayerAdapter | None  # the adapter of task t-1 (None for the first task)
    generator: torch.Generator  # seeded per task; layers are visited in a fixed order
    slot: int = 0  # the concept's slot: task index - 1 in a chain, the concept's index in the modular regime


@dataclass(frozen=True)
class EmbeddingSettings:
    """Embedding-weight tuning of one concept (a method's ``embeddings`` parameter): `tokens` new
    vectors named by `token_format` applied to the concept's phrase ("<sks>", then "<sks>_1", ...),
    initialised from `init_word` (None: the concept's own words) and trained at `learning_rate`."""

    tokens: int = 1
    init_word: str | None = None
    learning_rate: float = 5.0e-4
    token_format: str = "<{}>"

    @classmethod
    def from_param(cls, value: dict | None) -> EmbeddingSettings | None:
        return None if value is None else cls(**value)

    def as_param(self) -> dict:
        return asdict(self)

    def token(self, phrase: str) -> str:
        """The token of a concept phrase: token_format with the phrase's spaces as '-'."""
        return self.token_format.format("-".join(phrase.split()))

    def token_names(self, phrase: str) -> list[str]:
        """The tokens of every vector: the token, then diffusers' multi-vector names token_1, ..."""
        token = self.token(phrase)
        return [token] + [f"{token}_{index}" for index in range(1, self.tokens)]


EMBEDDINGS = Param(
    "embeddings",
    None,
    {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {
            # No "default" here: the config check fills defaults in, and a block's own values are
            # what its jobs' params record (EmbeddingSettings completes them).
            "tokens": {"type": "integer", "minimum": 1, "description": "vectors per concept (default 1)"},
            "init_word": {
                "type": ["string", "null"],
                "minLength": 1,
                "description": "initial vectors' word(s); null: the concept's own (default null)",
            },
            "learning_rate": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "the new vectors' learning rate (default 5.0e-4)",
            },
            "token_format": {
                "type": "string",
                "pattern": "^[^{}]*\\{\\}[^{}]*$",
                "description": "the token of a concept phrase, holding {} once (default '<{}>')",
            },
        },
    },
    "embedding-weight tuning (docs/methods.md): null (off) or a mapping "
    "{tokens, init_word, learning_rate, token_format}",
)
# Parameters every method accepts besides its own (see the module docstring). Off by default, and
# left out of the config schema's defaults and of `params` while off.
COMMON_PARAMS: tuple[Param, ...] = (EMBEDDINGS,)


def gaussian_adapter(ctx: InitContext) -> LayerAdapter:
    """peft's ``init_lora_weights="gaussian"``: A ~ N(0, (1/r)^2), B = 0."""
    A = torch.randn(ctx.rank, ctx.in_features, generator=ctx.generator, dtype=torch.float32) / ctx.rank
    return LayerAdapter(A=A, B=torch.zeros(ctx.out_features, ctx.rank), scale=ctx.scale)


class ContinualMethod(ABC):
    """Base class: fresh Gaussian adapter every task, trained adapter added into the merged weights."""

    name: ClassVar[str]
    adapter_stays_live: ClassVar[bool] = False
    freeze_down_projection: ClassVar[bool] = False  # A stays as init_adapter made it; only B trains

    param_specs: ClassVar[tuple[Param, ...]] = ()  # the accepted parameters, each declared once
    # The trainer's DreamBooth-script options (training.<option>, lorachain.training.config's
    # TRAINING_OPTIONS) this method's initialisation and fold are valid under; any other one set in
    # the training block is refused by check_training_options (config check and trainer alike).
    training_options: ClassVar[frozenset[str]] = frozenset(TRAINING_OPTION_NAMES)

    def __init__(self, **params):
        values, problems = check_values(self.all_param_specs(), params)
        if problems:
            raise MethodError("; ".join(with_owner(f"method {self.name!r}", problem) for problem in problems))
        embeddings = values.pop(EMBEDDINGS.name)
        self.embeddings = None if embeddings is None else EmbeddingSettings(**embeddings)
        self.params = values
        if self.embeddings is not None:  # recorded complete: the manifest says what was trained
            self.params[EMBEDDINGS.name] = self.embeddings.as_param()
        self.check_params()

    @classmethod
    def all_param_specs(cls) -> tuple[Param, ...]:
        """The method's own parameters and the common ones (:data:`COMMON_PARAMS`)."""
        return tuple(cls.param_specs) + COMMON_PARAMS

    @classmethod
    def parameters(cls) -> dict:
        """Accepted parameters of the method's own and their defaults (the common parameters,
        off by default, are not filled in: see :data:`COMMON_PARAMS`)."""
        return defaults(cls.param_specs)

    def check_params(self) -> None:
        """Checks across parameters that a per-parameter schema cannot make (raise MethodError)."""

    @classmethod
    def check_training_options(cls, used, key: str) -> None:
        """Refuse training options (names, as TrainingConfig.used_options gives them) this method
        does not declare in ``training_options``; `key` is the method's config key."""
        refused = sorted(set(used) - cls.training_options)
        if refused:
            raise MethodError(
                f"config key {key} (method {cls.name!r}) does not support "
                f"{', '.join(f'training.{option}' for option in refused)}; "
                f"turn {'it' if len(refused) == 1 else 'them'} off or drop this method "
                f"(it supports: {', '.join(sorted(cls.training_options)) or 'none'})"
            )

    def init_adapter(self, ctx: InitContext) -> LayerAdapter:
        return gaussian_adapter(ctx)

    def fold(self, merged: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor | None:
        return delta.clone() if merged is None else merged + delta

    def folded_terms(self, adapters: list[LayerAdapter]) -> list[tuple[float, LayerAdapter]] | None:
        """What :meth:`fold` makes of one layer's task adapters (in chain order) as a weighted sum
        of their low-rank products, sum_i c_i scale_i B_i A_i, or None where the fold is not known to
        be such a sum (an exporter then re-factorises the dense delta). The base fold adds every
        delta; a subclass with a fold of its own declares its terms, or stays None."""
        if type(self).fold is not ContinualMethod.fold:
            return None
        return [(1.0, adapter) for adapter in adapters]

    def row_mask(self, ctx: InitContext) -> torch.Tensor | None:
        """(out_features, 1) 0/1 mask of the rows of B this task may change (None: all rows)."""
        return None

    def erasure_rate(self, slot: int) -> float:
        """Probability that an output feature of the LoRA branch of concept slot `slot` is erased in
        a training forward pass."""
        return 0.0

    def check_slots(self, slots: int, key: str) -> None:
        """Fail before training when `slots` concepts cannot all get a slot (e.g. more than blocks)."""

    def check_widths(self, slots: int, rank: int, narrowest: int, key: str) -> None:
        """Fail before training when `slots` concepts at `rank` cannot fit a targeted layer whose input
        width is `narrowest` (the smallest among the targeted layers, read from the model's config)."""


def register_method(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str, *, key: str = "methods") -> type[ContinualMethod]:
    """The registered class (for class attributes such as ``param_specs``)."""
    if name not in _REGISTRY:
        raise MethodError(f"config key {key}: unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _REGISTRY[name]


def make_method(name: str, params: dict | None = None, *, key: str = "methods") -> ContinualMethod:
    """Instantiate a registered method; errors name the config key that holds it."""
    cls = method_class(name, key=key)
    try:
        return cls(**(params or {}))
    except MethodError as error:
        raise MethodError(f"config key {key}: {error}") from None
