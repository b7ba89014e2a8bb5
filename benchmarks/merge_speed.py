"""Seconds to merge k concept LoRAs into SDXL, per merge method, next to peft's add_weighted_adapter.

The layers are SDXL base's real attention projections (to_q, to_k, to_v, to_out.0 of its U-Net,
built on the meta device from the published config: 560 layers, 955 M dense weights); the LoRAs
are random float32 factors (default rank 64, 15 concepts: 93 M parameters each, 5.6 GB in all).
B is block-masked (concept k keeps row block k of k blocks) so that BlockLoRA's disjointness check
passes; the masks change no method's cost. Every method runs one layer at a time and drops each
merged layer at once (the dense merged deltas alone would take 3.8 GB).

Gradient fusion times the closed-form solve (:func:`lorachain.merging.fusion.fuse_layer`) with a
random SPD Gram per concept and layer, generated outside the timer. The cost of recording the Grams
(one X^T X per distinct layer input of every U-Net forward pass) is estimated separately, from
timed float64 products at SDXL's token counts (1024 px: 4096 tokens at 640 channels, 1024 at 1280,
77 text tokens of width 2048; batch 2 for classifier-free guidance).

peft: a module tree holding just the selected nn.Linear layers (base weights are zero-stride
views: no memory) is wrapped in a peft LoraModel with k adapters whose parameters share the same
factor tensors; ``add_weighted_adapter`` is timed for ``linear``, ``cat``, ``ties`` and
``dare_linear`` (the last two apply TIES / DARE to the A's and B's separately), and for the
dense-delta + SVD types ``ties_svd`` / ``dare_linear_svd`` on a small subset of layers only
(``--svd-layers``; extrapolated per layer shape), since they run one SVD per layer.

Usage: ``python benchmarks/merge_speed.py [--concepts 15] [--rank 64] [--layers N]``
(N < 560: a subset evenly spaced within each layer shape, times extrapolated to all 560 layers by
each shape's count).
CPU; prints figures only.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from state_bytes import SDXL_UNET_CONFIG, TARGET_MODULES  # noqa: E402

from lorachain.torch_env import torch  # noqa: E402

MIX_OF_SHOW_MINUTES = (30, 85)
ALL_METHODS = (
    "weighted_average",
    "orthogonal_adaptation",
    "blocklora",
    "ties",
    "dare_linear",
    "dare_ties",
    "gradient_fusion",
    "gram_recording",
    "peft_linear",
    "peft_cat",
    "peft_ties",
    "peft_dare_linear",
    "peft_ties_svd",
    "peft_dare_linear_svd",
)
PEFT_DENSITY = {
    "ties": 0.2,
    "dare_linear": 0.5,
    "ties_svd": 0.2,
    "dare_linear_svd": 0.5,
}  # as lorachain's ties / dare defaults  # L-BFGS gradient fusion of 14-15 concepts (Mix-of-Show / BlockLoRA paper)


def sdxl_layer_shapes() -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of SDXL's 560 targeted attention projections, sorted."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    suffixes = tuple("." + name for name in TARGET_MODULES)
    return sorted(
        (n, m.out_features, m.in_features)
        for n, m in unet.named_modules()
        if n.endswith(suffixes) and isinstance(m, torch.nn.Linear)
    )


def evenly_spaced(items: list, count: int) -> list:
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def layer_subset(shapes: list, count: int) -> list:
    """About `count` layers, evenly spaced within each (out, in) shape and at least one per shape,
    so per-shape times extrapolate to the whole U-Net."""
    if count >= len(shapes):
        return list(shapes)
    groups = defaultdict(list)
    for layer in shapes:
        groups[layer[1:]].append(layer)
    chosen = []
    for group in groups.values():
        chosen += evenly_spaced(group, max(1, round(count * len(group) / len(shapes))))
    return sorted(chosen)


def make_concepts(shapes, concepts: int, rank: int, seed: int = 0):
    from lorachain.lora import Concept, LayerAdapter
    from lorachain.methods.blocklora import block_mask

    generator = torch.Generator().manual_seed(seed)
    result = []
    for k in range(concepts):
        adapters = {}
        for name, out_features, in_features in shapes:
            A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            B = torch.randn(out_features, rank, generator=generator) * 1e-2 * block_mask(out_features, concepts, k)
            adapters[name] = LayerAdapter(A=A, B=B, scale=1.0)
        result.append(Concept(name=f"concept{k:02d}", adapters=adapters, slot=k))
    return result


def extrapolation(selected, all_shapes, seconds_by_shape: dict) -> float:
    """Seconds for all layers from per-shape seconds measured on the selected layers."""
    counted = Counter((o, i) for _, o, i in selected)
    total = Counter((o, i) for _, o, i in all_shapes)
    return sum(seconds_by_shape[shape] / counted[shape] * total[shape] for shape in total)


def time_merge(method, concepts, shapes) -> dict:
    """Wall seconds of a whole merge, and seconds per layer shape (each merged layer dropped at once)."""
    seconds = defaultdict(float)
    shape_of = {name: (o, i) for name, o, i in shapes}
    start = time.perf_counter()
    iterator = method.iter_merge(concepts)  # validation runs on the first next()
    while True:
        begin = time.perf_counter()
        try:
            layer, delta = next(iterator)
        except StopIteration:
            break
        seconds[shape_of[layer]] += time.perf_counter() - begin
        del delta
    return {"wall": time.perf_counter() - start, "by_shape": seconds}


def time_gradient_fusion(concepts, shapes, ridge: float) -> dict:
    from lorachain.merging.fusion import fuse_layer

    seconds = defaultdict(float)
    generator = torch.Generator().manual_seed(1)
    base_by_width: dict[int, torch.Tensor] = {}
    for name, out_features, in_features in shapes:
        if in_features not in base_by_width:  # one random SPD matrix per width, built once
            X = torch.randn(2 * in_features, in_features, generator=generator, dtype=torch.float64)
            base_by_width[in_features] = X.T @ X
        grams = [
            base_by_width[in_features] + (0.1 * (k + 1)) * torch.eye(in_features, dtype=torch.float64)
            for k in range(len(concepts))
        ]
        begin = time.perf_counter()
        fused = fuse_layer([c.adapters[name] for c in concepts], grams, ridge=ridge)
        seconds[(out_features, in_features)] += time.perf_counter() - begin
        del fused, grams
    return {"wall": sum(seconds.values()), "by_shape": seconds}


def float64_gemm_seconds(rows: int, width: int, repeats: int = 3) -> float:
    X = torch.randn(rows, width, dtype=torch.float32)
    G = torch.zeros(width, width, dtype=torch.float64)
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        X64 = X.to(torch.float64)
        G.add_(X64.T @ X64)
        best = min(best, time.perf_counter() - begin)
    return best


def gram_recording_estimate(all_shapes) -> dict:
    """Seconds of X^T X per U-Net forward pass (one 1024 px image, CFG batch 2) on this CPU, counting
    each distinct input once (attn1's q/k/v share one; all attn2 k/v share the text embeddings)."""
    tokens_by_width = {640: 2 * 4096, 1280: 2 * 1024}
    widths = {
        name.rsplit(".attn", 1)[0] + ".attn" + name.rsplit(".attn", 1)[1][0]: i
        for name, _, i in all_shapes
        if name.endswith(".to_q")
    }
    products = []  # (rows, width) of every distinct input per forward
    for _block, width in sorted(widths.items()):
        # attn1: the q/k/v input and the to_out input; attn2: the to_q input and the to_out input
        products += [(tokens_by_width[width], width)] * 2
    products.append((2 * 77, 2048))  # the text embeddings (every attn2 to_k / to_v), once per forward
    timed = {shape: float64_gemm_seconds(*shape) for shape in set(products)}
    flops = sum(2 * rows * width * width for rows, width in products)
    return {"seconds": sum(timed[p] for p in products), "products": len(products), "gflop": flops / 1e9}


def build_peft_model(concepts, shapes, rank: int):
    from peft import LoraConfig, get_peft_model

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleDict()
            for index, (_, out_features, in_features) in enumerate(shapes):
                linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
                # zero-stride view: a real CPU tensor of the right shape that takes no memory
                linear.weight = torch.nn.Parameter(
                    torch.zeros(()).expand(out_features, in_features), requires_grad=False
                )
                self.layers[f"l{index:03d}"] = linear

    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=[f"l{i:03d}" for i in range(len(shapes))], init_lora_weights=False
    )
    model = None
    for k, concept in enumerate(concepts):
        name = f"c{k:02d}"
        if model is None:
            model = get_peft_model(Layers(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        for index, (layer, _, _) in enumerate(shapes):
            module = model.base_model.model.layers[f"l{index:03d}"]
            adapter = concept.adapters[layer]
            module.lora_A[name].weight = torch.nn.Parameter(adapter.A, requires_grad=False)  # shares the factors
            module.lora_B[name].weight = torch.nn.Parameter(adapter.B, requires_grad=False)
    return model


def time_peft(model, concepts, combination_type: str, **kwargs) -> float:
    names = [f"c{k:02d}" for k in range(len(concepts))]
    weights = [1.0 / len(names)] * len(names)
    begin = time.perf_counter()
    with torch.no_grad():
        model.base_model.add_weighted_adapter(names, weights, "combined", combination_type=combination_type, **kwargs)
    seconds = time.perf_counter() - begin
    model.base_model.delete_adapter("combined")
    gc.collect()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", type=int, default=15)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--layers", type=int, default=560, help="evenly spaced subset of the 560 layers (times are extrapolated)"
    )
    parser.add_argument(
        "--svd-layers", type=int, default=8, help="layers for peft's ties_svd / dare_linear_svd (extrapolated)"
    )
    parser.add_argument(
        "--methods", default=",".join(ALL_METHODS), help=f"comma-separated subset of {','.join(ALL_METHODS)}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {','.join(ALL_METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from lorachain.methods import make_merge

    all_shapes = sdxl_layer_shapes()
    shapes = layer_subset(all_shapes, args.layers)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); SDXL: {len(all_shapes)} targeted layers, "
        f"shapes (out, in) x count {dict(Counter((o, i) for _, o, i in all_shapes))}"
    )
    dense = sum(o * i for _, o, i in shapes)
    factors = sum(args.rank * (o + i) for _, o, i in shapes)
    print(
        f"measured on {len(shapes)} layers: {args.concepts} concepts x rank {args.rank} = "
        f"{args.concepts * factors / 1e6:.0f} M factor "
        f"parameters ({args.concepts * factors * 4 / 1e9:.2f} GB); {dense / 1e6:.0f} M dense weights per merged model"
    )
    begin = time.perf_counter()
    concepts = make_concepts(shapes, args.concepts, args.rank)
    print(f"(random factors built in {time.perf_counter() - begin:.1f} s)\n")

    rows = []  # (method, measured seconds, seconds for all 560 layers, extrapolated?)

    def record(label, measured, full, extrapolated):
        full = full if extrapolated else measured  # all layers measured: the wall time, validation included
        rows.append((label, measured, full, extrapolated))
        print(f"  {label:52} {measured:9.2f} s measured   {full:9.2f} s for 560 layers", flush=True)

    subset = len(shapes) < len(all_shapes)
    for key, name, params in [
        ("weighted_average", "weighted_average", {}),
        ("orthogonal_adaptation", "orthogonal_adaptation", {}),
        ("blocklora", "blocklora", {}),
        ("ties", "ties", {}),
        ("dare_linear", "dare", {"variant": "linear"}),
        ("dare_ties", "dare", {"variant": "ties"}),
    ]:
        if key in methods:
            method = make_merge(name, params)
            result = time_merge(method, concepts, shapes)
            shown = " ".join(f"{k} {method.params[k]}" for k in ("variant", "density") if k in method.params)
            record(
                f"lorachain {name}" + (f" ({shown})" if shown else ""),
                result["wall"],
                extrapolation(shapes, all_shapes, result["by_shape"]),
                subset,
            )
    if "gradient_fusion" in methods:
        fusion = time_gradient_fusion(concepts, shapes, ridge=1e-6)
        record(
            "lorachain gradient_fusion (closed-form solve)",
            fusion["wall"],
            extrapolation(shapes, all_shapes, fusion["by_shape"]),
            subset,
        )
    if "gram_recording" in methods:
        recording = gram_recording_estimate(all_shapes)
        print(
            f"\n  gram recording, per concept: {recording['products']} distinct X^T X products per U-Net forward "
            f"({recording['gflop']:.0f} GFLOP float64) take {recording['seconds']:.1f} s on this CPU per forward "
            "(1024 px, CFG batch 2); e.g. 50 denoising steps x 4 prompts = "
            f"{200 * recording['seconds'] / 60:.0f} min per concept "
            f"(a GPU at 50 TFLOP/s float64: {200 * recording['gflop'] / 5e4:.0f} s)\n"
        )

    peft_types = [(m, m.removeprefix("peft_")) for m in methods if m.startswith("peft_") and not m.endswith("_svd")]
    if peft_types:
        begin = time.perf_counter()
        model = build_peft_model(concepts, shapes, args.rank)
        print(
            f"  (peft LoraModel with {args.concepts} adapters on {len(shapes)} layers "
            f"built in {time.perf_counter() - begin:.1f} s)"
        )
        for _, combination_type in peft_types:
            kwargs = {"density": PEFT_DENSITY[combination_type]} if combination_type in PEFT_DENSITY else {}
            seconds = time_peft(model, concepts, combination_type, **kwargs)
            full = seconds * len(all_shapes) / len(shapes)  # one call: scaled by the layer count
            record(
                f"peft add_weighted_adapter {combination_type}" + (f" (density {kwargs['density']})" if kwargs else ""),
                seconds,
                full,
                subset,
            )
        del model
        gc.collect()
    svd_types = [m.removeprefix("peft_") for m in methods if m.startswith("peft_") and m.endswith("_svd")]
    if svd_types:
        svd_shapes = layer_subset(shapes, args.svd_layers)
        svd_model = build_peft_model(concepts, svd_shapes, args.rank)
        for combination_type in svd_types:
            seconds = time_peft(svd_model, concepts, combination_type, density=PEFT_DENSITY[combination_type])
            # one call over a few layers: scaled by dense size (the dense deltas and the SVDs dominate)
            full = seconds * sum(o * i for _, o, i in all_shapes) / sum(o * i for _, o, i in svd_shapes)
            record(f"peft add_weighted_adapter {combination_type} ({len(svd_shapes)} layers)", seconds, full, True)
    print()
    header = (
        f"{'method (' + str(args.concepts) + ' concepts, rank ' + str(args.rank) + ')':62} {'s, all 560 layers':>18}"
    )
    print(header)
    print("-" * len(header))
    for label, _measured, full, extrapolated in rows:
        print(f"{label:62} {full:18.2f}" + ("  (extrapolated)" if extrapolated else ""))
    fusion_full = next((full for label, _, full, _ in rows if "gradient_fusion" in label), None)
    if fusion_full:
        print(
            f"\ngradient fusion closed form: {fusion_full / 60:.1f} min for all 560 layers on this CPU vs "
            f"{MIX_OF_SHOW_MINUTES[0]}-{MIX_OF_SHOW_MINUTES[1]} min of L-BFGS reported for Mix-of-Show "
            f"({MIX_OF_SHOW_MINUTES[0] * 60 / fusion_full:.0f}-{MIX_OF_SHOW_MINUTES[1] * 60 / fusion_full:.0f}x less; "
            "recording the Grams comes on top)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
