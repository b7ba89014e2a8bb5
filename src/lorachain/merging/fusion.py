"""Gradient fusion (Mix-of-Show, NeurIPS 2023) in closed form, and the recorder of layer inputs.

Mix-of-Show fuses the concepts of one linear layer by minimising, with L-BFGS (30-85 minutes for
14-15 concepts), how far the fused layer's outputs move from each concept's own outputs on that
concept's recorded inputs:

    W* = argmin_W sum_i w_i || X_i (W0 + delta_i)^T - X_i W^T ||_F^2

(rows of X_i: the layer's input vectors while concept i's prompts run through concept i's model).
Only the Gram matrices G_i = X_i^T X_i enter, and the problem is linear least squares, so with
D = W - W0 (W0 cancels) the normal equations give the closed form

    D* (sum_i w_i G_i) = sum_i w_i delta_i G_i,   i.e.  D* = (sum_i w_i delta_i G_i)(sum_i w_i G_i)^-1.

What this module solves (float64, one layer at a time) adds a ridge that pulls D toward a prior:

    D* = argmin_D sum_i w_i ||(D - delta_i) X_i^T||^2 + lam ||D - P||^2,   lam = ridge * trace(G)/n
    =>  D* (G + lam I) = sum_i w_i delta_i G_i + lam P,                    G = sum_i w_i G_i

``prior="mean"`` (default): P = sum_i w_i delta_i / sum_i w_i, the weighted average. Input
directions that no concept's inputs excite (the null space of G: cross-attention to_k/to_v see only
the text embeddings, at most 77 tokens per prompt against 2048 input features in SDXL, so G is
rank-deficient there) keep the weighted average instead of falling back to W0, and the ridge never
biases the excited directions of a single concept: with one concept the right-hand side is
delta_1 (G + lam I), so D* = delta_1 exactly, for any ridge and any rank of G (its outputs on its
inputs are reproduced). ``prior="base"``: P = 0, the literal (sum_i delta_i G_i)(G + lam I)^-1;
unexcited directions keep W0.

``ridge`` (relative to the mean diagonal of G, default 1e-6) makes G + lam I positive definite, so
the system is solved by Cholesky (``torch.linalg.cholesky_ex`` + ``cholesky_solve``), never by an
explicit inverse. ``ridge=0`` gives the exact least-squares solution: the pseudo-inverse on the range
of G (eigenvalues below ``rcond`` times the largest are treated as zero; default 1e-10) plus the prior
on its null space. The same eigen-decomposition path is the fallback when Cholesky fails (a G that
rounding made slightly indefinite).

Gram files: :class:`GramRecorder` accumulates X^T X in float64 (inputs cast to float64 before the
product, so millions of rows lose nothing); :func:`save_grams` stores them as float32 by default
(half the bytes; relative rounding 6e-8 is far below what fused fp16/fp32 weights resolve) and
:func:`load_grams` returns float64 again. Row counts travel in the metadata. An SDXL concept records
G for 560 layers with inputs 640-2048 wide: 4.8 GB in float32, 2.5 GB once the 140 cross-attention
to_k / to_v layers, which all see the same text embeddings and so have identical Grams, are stored
once. The recorder likewise computes X^T X once per distinct input tensor: attn1's to_q / to_k /
to_v share one input, and the text embeddings reach every attn2 to_k / to_v.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from lorachain.files import canonical_safetensors
from lorachain.lazy_torch import torch
from lorachain.lora import LayerAdapter

GRAM_FORMAT = "lorachain-grams-1"
PRIORS = ("mean", "base")
# What a concept's layer inputs are recorded on (see lorachain.modular.record_layer_inputs):
# its training images, noised ("images", this project's default), or the steps of a sampling
# trajectory of its prompt ("sampling", as Mix-of-Show records them).
RECORDING_SOURCES = ("images", "sampling")
# Which rows of the cross-attention K/V layers' inputs (the text encoder's token features) enter
# their Grams: every token ("all") or only the concept's own tokens ("concept").
CROSS_ATTENTION_ROWS = ("all", "concept")
# Diffusers' names of the layers whose input is the text context (Mix-of-Show's "crosskv" layers).
CROSS_ATTENTION_KV = ("attn2.to_k", "attn2.to_v")
DEFAULT_RIDGE = 1e-6
DEFAULT_RCOND = 1e-10
RECENT_INPUTS = (
    8  # inputs whose X^T X the recorder keeps for reuse (SDXL: 4-5 distinct inputs between text-embedding uses)
)


class GramError(ValueError):
    """Recorded inputs that cannot be used; the message names the file, concept or layer."""


def recording_name(source: str, cross_attention_rows: str) -> str:
    """The name of one way of recording, as it appears in a gram file's name: "images",
    "sampling", "images-concept", "sampling-concept"."""
    if source not in RECORDING_SOURCES or cross_attention_rows not in CROSS_ATTENTION_ROWS:
        raise GramError(
            f"recording: source must be one of {RECORDING_SOURCES} and cross_attention_rows one of "
            f"{CROSS_ATTENTION_ROWS}, got {source!r} and {cross_attention_rows!r}"
        )
    return source if cross_attention_rows == "all" else f"{source}-{cross_attention_rows}"


def parse_recording(name: str) -> tuple[str, str]:
    """(source, cross_attention_rows) of a :func:`recording_name`."""
    source, _, rows = name.partition("-")
    rows = rows or "all"
    recording_name(source, rows)  # raises for an unknown part
    return source, rows


def is_cross_attention_kv(layer: str) -> bool:
    return any(layer.endswith(suffix) for suffix in CROSS_ATTENTION_KV)


# ---------------------------------------------------------------------------------------- recording


def _linear_of(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The nn.Linear a targeted module computes with (itself, or peft's wrapped base layer)."""
    if isinstance(module, torch.nn.Linear):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, torch.nn.Linear) else None


class GramRecorder:
    """Context manager that accumulates G = X^T X (float64) of the inputs of named linear layers.

    Every forward of a named layer adds x^T x, with all leading dimensions of its input x flattened
    into rows, and the number of rows (the product is reused when the very same, unmodified input
    tensor reaches another named layer). ``recorder.grams`` maps layer -> (G on the CPU, rows) for
    the layers that saw input. Accumulation happens on the input's device (float64; MPS lacks it,
    so there on the CPU).

    ``context_layers`` (layer names) take only some token rows of their (batch, tokens, features)
    input: those where :attr:`context_rows`, a (batch, tokens) boolean mask set by the caller before
    each forward, is true (Mix-of-Show fits the cross-attention K/V layers on the concept's own
    token features). With no mask set they take every row, like the other layers."""

    def __init__(self, module: torch.nn.Module, layer_names: Iterable[str], context_layers: Iterable[str] = ()):
        modules = dict(module.named_modules())
        self.layers: dict[str, torch.nn.Module] = {}
        for name in layer_names:
            if name not in modules:
                raise GramError(f"GramRecorder: the model has no submodule {name!r}")
            if _linear_of(modules[name]) is None:
                raise GramError(
                    f"GramRecorder: submodule {name!r} is a {type(modules[name]).__name__}, not a linear layer"
                )
            self.layers[name] = modules[name]
        self.context_layers = set(context_layers) & set(self.layers)
        self.context_rows: torch.Tensor | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        self._handles: list = []
        # id -> (weak reference to the input, its version, its X^T X) of the last few distinct inputs:
        # one tensor feeds several layers (attn1 to_q/to_k/to_v; the text embeddings every attn2 to_k/to_v).
        self._recent: OrderedDict[int, tuple] = OrderedDict()

    def _hook(self, name: str, in_features: int):
        def record(_module, args):
            source = args[0]
            x = source.detach()
            if x.shape[-1] != in_features:
                raise GramError(
                    f"GramRecorder: layer {name!r} got inputs of width {x.shape[-1]}, expected {in_features}"
                )
            key = (id(source), name in self.context_layers and self.context_rows is not None)
            cached = self._recent.get(key)
            if cached is not None and cached[0]() is source and cached[1] == source._version:
                product, count = cached[2], cached[3]
                self._recent.move_to_end(key)
            else:
                rows = self._rows_of(name, x)
                device = rows.device if rows.device.type != "mps" else torch.device("cpu")
                rows64 = rows.to(device=device, dtype=torch.float64)
                product, count = rows64.T @ rows64, rows.shape[0]
                # A weak reference: a freed input (whose id a new tensor may reuse) never matches,
                # and caching keeps no activations or autograd graph alive.
                self._recent[key] = (weakref.ref(source), source._version, product, count)
                if len(self._recent) > RECENT_INPUTS:
                    self._recent.popitem(last=False)
            if name in self._sums:
                self._sums[name].add_(product)
            else:
                self._sums[name] = product.clone()
            self._rows[name] = self._rows.get(name, 0) + count

        return record

    def _rows_of(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The input rows that enter layer `name`'s Gram: for a context layer with a mask set,
        the masked token rows; otherwise every row."""
        mask = self.context_rows if name in self.context_layers else None
        if mask is None:
            return x.reshape(-1, x.shape[-1])
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            raise GramError(
                f"GramRecorder: layer {name!r} got inputs of shape {tuple(x.shape)}, "
                f"but the token mask is {tuple(mask.shape)} (batch, tokens)"
            )
        return x[mask.to(x.device)]

    def __enter__(self) -> "GramRecorder":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name, _linear_of(module).in_features)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recent.clear()

    def reset(self) -> None:
        self._sums.clear()
        self._rows.clear()
        self._recent.clear()

    @property
    def grams(self) -> dict[str, tuple[torch.Tensor, int]]:
        return {name: (self._sums[name].cpu(), self._rows[name]) for name in sorted(self._sums)}

    @property
    def unseen(self) -> list[str]:
        """Named layers that received no input (a prompt path that never reaches them)."""
        return sorted(set(self.layers) - set(self._sums))


def save_grams(path: str | Path, grams: dict[str, tuple[torch.Tensor, int]], dtype: torch.dtype | None = None) -> None:
    """Write layer -> (G, rows) as safetensors (G in `dtype`, default float32; rows in the metadata). Layers whose G
    is bitwise identical to an earlier layer's (SDXL: the 140 cross-attention to_k / to_v layers
    all see the same text embeddings) are stored once and listed in the metadata's aliases."""
    from safetensors.torch import save_file

    dtype = torch.float32 if dtype is None else dtype
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # layer -> the stored layer whose G is bitwise the same
    stored_by_fingerprint: dict[tuple, list[str]] = {}
    for layer in sorted(grams):
        G = grams[layer][0].detach().to("cpu", dtype).contiguous()
        fingerprint = (tuple(G.shape), float(G.sum()), float(G.diagonal().sum()))
        twin = next(
            (other for other in stored_by_fingerprint.get(fingerprint, []) if torch.equal(tensors[other], G)), None
        )
        if twin is not None:
            aliases[layer] = twin
        else:
            tensors[layer] = G
            stored_by_fingerprint.setdefault(fingerprint, []).append(layer)
    metadata = {
        "format": GRAM_FORMAT,
        "rows": json.dumps({layer: int(n) for layer, (_, n) in grams.items()}, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    canonical_safetensors(temporary)  # three metadata keys: their order would follow the process
    temporary.replace(path)


def load_grams(path: str | Path) -> dict[str, tuple[torch.Tensor, int]]:
    """Read a file of :func:`save_grams`; G comes back as float64."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != GRAM_FORMAT:
                raise GramError(
                    f"{path}: not a gram file (metadata format {metadata.get('format')!r}, expected {GRAM_FORMAT!r})"
                )
            rows = json.loads(metadata["rows"])
            aliases = json.loads(metadata.get("aliases", "{}"))
            stored = {layer: handle.get_tensor(layer).to(torch.float64) for layer in handle.keys()}
            grams = {}
            for layer, n in rows.items():
                source = aliases.get(layer, layer)
                if source not in stored:
                    raise GramError(f"{path}: layer {layer!r} has a row count but no stored matrix ({source!r})")
                grams[layer] = (stored[source], int(n))  # aliased layers share one read-only tensor
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as error:
        raise GramError(f"{path}: not a readable gram file ({error})") from None
    return dict(sorted(grams.items()))


# ---------------------------------------------------------------------------------------- fusing


def _dense_float64(delta: torch.Tensor | LayerAdapter, device) -> torch.Tensor:
    if isinstance(delta, LayerAdapter):
        return delta.scale * (delta.B.to(device, torch.float64) @ delta.A.to(device, torch.float64))
    return delta.to(device, torch.float64)


def _right_hand_side(deltas, grams, weights, shift: float, device) -> torch.Tensor:
    """sum_i w_i delta_i (G_i + shift I), float64. For LoRA factors as one product of the factors
    concatenated along the rank, [w_i s_i B_i]_i @ [A_i G_i + shift A_i]_i, so no dense delta is formed."""
    used = [(w, d, g) for w, d, g in zip(weights, deltas, grams) if w != 0]
    if all(isinstance(d, LayerAdapter) for _, d, _ in used):
        left = torch.cat([w * d.scale * d.B.to(device, torch.float64) for w, d, _ in used], dim=1)
        right = []
        for _, d, g in used:
            A = d.A.to(device, torch.float64)
            product = A @ g.to(device, torch.float64)
            if shift:
                product.add_(A, alpha=shift)
            right.append(product)
        return left @ torch.cat(right, dim=0)
    rhs = None
    for w, d, g in used:
        dense = _dense_float64(d, device)
        term = dense @ g.to(device, torch.float64)
        if shift:
            term.add_(dense, alpha=shift)
        rhs = term.mul_(w) if rhs is None else rhs.add_(term, alpha=w)
    return rhs


def fuse_layer(
    deltas: Sequence[torch.Tensor | LayerAdapter],
    grams: Sequence[torch.Tensor],
    ridge: float = DEFAULT_RIDGE,
    weights: Sequence[float] | None = None,
    prior: str = "mean",
    rcond: float = DEFAULT_RCOND,
) -> torch.Tensor:
    """Fused delta D* (out, in), float32, of one layer (see the module docstring for the equation).

    `deltas`: each concept's delta_i as a dense (out, in) tensor or its LoRA factors (cheaper: no
    dense delta is formed); `grams`: each concept's G_i (in, in), of which the solvers read the
    lower triangle; `weights`: w_i (default 1/k); `ridge` relative to trace(G)/in."""
    if len(deltas) == 0 or len(deltas) != len(grams):
        raise GramError(
            f"fuse_layer: {len(deltas)} delta(s) and {len(grams)} gram(s); need one gram per delta, at least one"
        )
    if prior not in PRIORS:
        raise GramError(f"fuse_layer: prior must be one of {PRIORS}, got {prior!r}")
    if ridge < 0:
        raise GramError(f"fuse_layer: ridge must be >= 0, got {ridge}")
    weights = [1.0 / len(deltas)] * len(deltas) if weights is None else [float(w) for w in weights]
    device = grams[0].device
    width = grams[0].shape[0]
    G = torch.zeros(width, width, dtype=torch.float64, device=device)
    for w, g in zip(weights, grams):
        if w != 0:
            G.add_(g.to(device, torch.float64), alpha=w)  # in place: SDXL Grams are up to 2048^2
    mean_diagonal = float(torch.diagonal(G).sum()) / width
    if not mean_diagonal > 0:
        raise GramError("fuse_layer: the weighted Gram matrix is zero; no inputs were recorded for this layer")
    lam = ridge * mean_diagonal
    # lam * P with P = sum_i w_i delta_i / sum_i w_i folds into the right-hand side as a shift of every G_i
    shift = lam / sum(weights) if prior == "mean" else 0.0
    rhs = _right_hand_side(deltas, grams, weights, shift, device)
    if lam > 0:
        G.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, factor).T.to(torch.float32)
        G.diagonal().sub_(lam)
    # Exact least squares (ridge 0) or a G that rounding left slightly indefinite: solve on the
    # eigenbasis of G, dropping (ridge 0) or ridging (ridge > 0) its smallest eigenvalues.
    eigenvalues, vectors = torch.linalg.eigh(G)
    eigenvalues = eigenvalues.clamp(min=0)
    if lam > 0:
        return (((rhs @ vectors) / (eigenvalues + lam)) @ vectors.T).to(torch.float32)
    kept = eigenvalues > rcond * eigenvalues.max()
    basis = vectors[:, kept]
    fused = ((rhs @ basis) / eigenvalues[kept]) @ basis.T
    if prior == "mean":  # the null space of G keeps the weighted mean of the deltas
        mean = sum(w * _dense_float64(d, device) for w, d in zip(weights, deltas) if w != 0) / sum(weights)
        fused += mean - (mean @ basis) @ basis.T
    return fused.to(torch.float32)
