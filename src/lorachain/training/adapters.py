"""The LoRA adapter of a task: the targeted layers, the method's initial factors (and the row
masks of B it asks for), peft injection, randomized output erasure, and the trained factors."""

from __future__ import annotations

import re

from lorachain.methods import ContinualMethod, InitContext, LayerAdapter
from lorachain.state import FoldedState
from lorachain.torch_env import torch
from lorachain.training.config import TrainingConfig, TrainingError


def targeted(name: str, target_modules) -> bool:
    """peft's ``target_modules`` semantics: a string is a regex the full module name must match
    (``re.fullmatch``); a list names module-name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name.endswith(tuple("." + suffix for suffix in target_modules))


def resolved_targets(model, target_modules):
    """`target_modules`, or (None) the default targets of the denoiser `model`'s family."""
    if target_modules is not None:
        return target_modules
    from lorachain.models.denoisers import default_targets_of

    return default_targets_of(model)


def lora_layers(unet, target_modules) -> dict[str, torch.nn.Linear]:
    """The targeted linear layers, by module name, in a fixed order (None: the family's defaults)."""
    target_modules = resolved_targets(unet, target_modules)
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as error:
            raise TrainingError(
                f"config key training.target_modules: {target_modules!r} is not a valid regex ({error})"
            ) from None
    matched = {name: module for name, module in unet.named_modules() if targeted(name, target_modules)}
    layers = {name: module for name, module in matched.items() if isinstance(module, torch.nn.Linear)}
    if isinstance(target_modules, str) and len(layers) < len(matched):  # peft would wrap (or refuse) them
        others = sorted(set(matched) - set(layers))
        raise TrainingError(
            f"config key training.target_modules: {target_modules!r} also matches modules that are not linear "
            f"layers ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); narrow the pattern"
        )
    if not layers:
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise TrainingError(
            f"config key training.target_modules: {shown!r} match no linear layer of the {type(unet).__name__}; "
            f"nearest linear layer names: {', '.join(nearest_linear_names(unet, target_modules))}"
        )
    if isinstance(target_modules, (list, tuple)):
        unmatched = [suffix for suffix in target_modules if not any(name.endswith("." + suffix) for name in layers)]
        if unmatched:  # peft would train the rest silently: a typo in one entry must not go unnoticed
            raise TrainingError(
                f"config key training.target_modules: {unmatched!r} match no linear layer of the "
                f"{type(unet).__name__}; nearest linear layer names: "
                f"{', '.join(nearest_linear_names(unet, unmatched))}"
            )
    return dict(sorted(layers.items()))


def nearest_linear_names(model, target_modules, count: int = 5) -> list[str]:
    """The model's linear-layer name suffixes most like the targets (difflib), for an error."""
    import difflib

    suffixes = sorted(
        {
            ".".join(name.split(".")[-depth:])
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            for depth in (1, 2)
        }
    )
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    near = [match for target in wanted for match in difflib.get_close_matches(target, suffixes, n=count, cutoff=0.4)]
    return list(dict.fromkeys(near))[:count] or suffixes[:count]


def check_rank(layers: dict[str, torch.nn.Linear], rank: int) -> None:
    smallest = min(min(module.in_features, module.out_features) for module in layers.values())
    if rank > smallest:
        name = min(layers, key=lambda n: min(layers[n].in_features, layers[n].out_features))
        raise TrainingError(
            f"config key training.rank: {rank} exceeds the smallest targeted layer ({name}: {smallest} features); "
            f"use at most {smallest}"
        )


def initial_adapters(
    method: ContinualMethod, layers, state: FoldedState, config: TrainingConfig, seed: int, slot: int
) -> tuple[dict[str, LayerAdapter], dict[str, torch.Tensor]]:
    """The method's initial factors of every layer, and the row masks of B it asks for."""
    generator = torch.Generator().manual_seed(seed)
    adapters, row_masks = {}, {}
    for name, module in layers.items():
        context = InitContext(
            layer=name,
            out_features=module.out_features,
            in_features=module.in_features,
            rank=config.rank,
            scale=config.scale,
            tasks_done=state.tasks_done,
            merged=None if state.merged.get(name) is None else state.merged[name].cpu(),
            previous=None if state.adapter is None else state.adapter.get(name),
            generator=generator,
            slot=slot,
        )
        adapter = method.init_adapter(context)
        if adapter.A.shape != (config.rank, module.in_features) or adapter.B.shape != (
            module.out_features,
            config.rank,
        ):
            raise RuntimeError(f"{method.name}.init_adapter returned wrong shapes for {name}")
        mask = method.row_mask(context)
        if mask is not None:
            row_masks[name] = mask
            adapter = LayerAdapter(A=adapter.A, B=adapter.B * mask, scale=adapter.scale)
        adapters[name] = adapter
    return adapters, row_masks


class OutputErasure:
    """Randomized output erasure (training only): the LoRA branch's output features of every layer
    are multiplied by a fresh Bernoulli(1 - rate) mask at every step. The masks of a step derive from
    (seed, step) alone, so a resumed run and gradient checkpointing's recomputation see the same ones."""

    def __init__(self, unet, names, rate: float, seed: int, device):
        self.rate, self.seed, self.device = rate, seed, device
        modules = dict(unet.named_modules())
        self.sizes = {name: modules[name].out_features for name in names}
        self.masks: dict[str, torch.Tensor] = {}
        self.handles = [
            modules[name]
            .lora_B["default"]
            .register_forward_hook(lambda module, args, output, name=name: output * self.masks[name].to(output.dtype))
            for name in names
        ]

    def begin_step(self, step: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draws = (torch.rand(sum(self.sizes.values()), generator=generator) >= self.rate).float().to(self.device)
        self.masks = dict(zip(self.sizes, torch.split(draws, list(self.sizes.values()))))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def inject_lora(unet, adapters: dict[str, LayerAdapter], config: TrainingConfig) -> dict:
    """Wrap the targeted layers with peft LoRA and load the method's initial factors. peft's own
    ``lora_dropout`` and ``use_rslora`` are passed only when set, so that a state trained without
    them records the LoRA config it always did."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    options = {"lora_dropout": config.lora_dropout} if config.lora_dropout else {}
    if config.use_rslora:
        options["use_rslora"] = True
    targets = resolved_targets(unet, config.target_modules)
    regex = isinstance(targets, str)
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        # a regex goes to peft as given (lora_layers refused one that matches other than linear layers)
        target_modules=targets if regex else list(targets),
        init_lora_weights="gaussian",
        **options,
    )
    unet.add_adapter(lora_config)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, adapter in adapters.items():
            layer = modules[name]
            assert isinstance(layer, LoraLayer), name
            layer.lora_A["default"].weight.copy_(adapter.A)
            layer.lora_B["default"].weight.copy_(adapter.B)
    return lora_config.to_dict()


def trained_adapters(unet, names, scale: float) -> dict[str, LayerAdapter]:
    modules = dict(unet.named_modules())
    return {
        name: LayerAdapter(
            A=modules[name].lora_A["default"].weight.detach().float().cpu().clone(),
            B=modules[name].lora_B["default"].weight.detach().float().cpu().clone(),
            scale=scale,
        )
        for name in names
    }
