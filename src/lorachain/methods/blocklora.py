"""BlockLoRA (BlockLoRA paper, Eq. 3-5): randomized output erasure and blockwise parameterization,
training side and merge side.

Training the LoRA of concept slot k (:class:`BlockLoRA`): h = W0 x + r(lambda) ⊙ ((M_k ⊙ B_k) A_k x)
* alpha / r, where r(lambda) is a fresh Bernoulli(1 - lambda) mask over the output features at every
forward pass (training only; the paper gives no lambda, so ``erasure`` is a parameter, one number or
one lambda_i per concept slot as in the paper's training equation; erased
outputs are not rescaled, as in the paper's equation) and M_k keeps the k-th of ``num_blocks``
contiguous row blocks of the output dimension (:func:`block_rows`, :func:`block_mask`, broadcast
over B's rank columns). Blocks follow ``torch.tensor_split`` semantics: with out_features = q*K + m,
the first m blocks get q+1 rows and the others q (1280 rows in 15 blocks: 5 blocks of 86 rows, then
10 of 85). K bounds how many concepts can merge; asking for slot >= K is an error. Rows of B outside
the block start at zero and stay exactly zero.

``blockwise: false`` and ``erasure: 0`` are the paper's ablations (its Table 3). In a continual
chain the slot is the task index - 1 and the state after a task is the sum of the deltas.

Merge side (:class:`BlockLoRAMerge`): W = W0 + sum_i alpha_i (M_i ⊙ B_i) A_i, with alpha_i = 1 by
default (each concept's rows are its own model) or Eq. 5's sum_i alpha_i = 1 (``weights: mean``).
The rows a concept changes are checked on the data (:func:`nonzero_rows`), so
``num_blocks`` is not needed at merge time: two concepts whose deltas have a nonzero row in common
are refused, naming both and the layer. Disjoint rows give zero cosine similarity and no sign
conflicts between the merged deltas. See docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from lorachain.lazy_torch import torch
from lorachain.lora import Concept
from lorachain.methods.base import ContinualMethod, MethodError, register_method
from lorachain.methods.merge_base import MergeMethod, register_merge, weights_param
from lorachain.params import Param


def block_rows(out_features: int, num_blocks: int, slot: int) -> slice:
    """The rows of slot `slot` among `num_blocks` contiguous blocks (torch.tensor_split semantics)."""
    if num_blocks < 1:
        raise ValueError(f"block_rows: num_blocks must be >= 1, got {num_blocks}")
    if num_blocks > out_features:
        raise ValueError(
            f"block_rows: {num_blocks} blocks do not fit in {out_features} output rows (a block would be empty)"
        )
    if not 0 <= slot < num_blocks:
        raise ValueError(
            f"block_rows: slot {slot} is outside 0..{num_blocks - 1}: "
            f"the layers have num_blocks={num_blocks} row blocks, "
            f"so asking for slot {slot} is asking for more concepts than blocks"
        )
    base, remainder = divmod(out_features, num_blocks)
    start = slot * base + min(slot, remainder)
    return slice(start, start + base + (1 if slot < remainder else 0))


def block_mask(out_features: int, num_blocks: int, slot: int) -> torch.Tensor:
    """(out_features, 1) float32 0/1 mask M of the slot's rows; (M * B) masks B's rows."""
    mask = torch.zeros(out_features, 1, dtype=torch.float32)
    mask[block_rows(out_features, num_blocks, slot)] = 1.0
    return mask


def nonzero_rows(adapter, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (out,) of the rows where scale * B @ A is nonzero (restricted to `rows` when given)."""
    B = adapter.B if rows is None else adapter.B[rows]
    candidate = (B != 0).any(dim=1)
    if not candidate.any():
        return candidate if rows is None else torch.zeros_like(rows)
    # A row of B can be nonzero while its product with A is zero only if it lies in A's left
    # null space; check the product on the candidate rows alone.
    exact = torch.zeros_like(candidate)
    exact[candidate] = ((B[candidate] @ adapter.A) != 0).any(dim=1)
    if rows is None:
        return exact
    full = torch.zeros_like(rows)
    full[rows] = exact
    return full


@register_method
class BlockLoRA(ContinualMethod):
    """The training side: a row block per concept slot and randomized output erasure."""

    name = "blocklora"
    # Not lora_dropout: randomized output erasure is the method's dropout of the LoRA branch (its
    # training equation, Eq. 3, and the erasure ablation of Table 3); peft's input dropout on top
    # would train a different branch than the one `erasure` describes. The fold (row-block deltas
    # scale * (M_k B) A) holds under every other option, rsLoRA's scale included.
    training_options = ContinualMethod.training_options - {"lora_dropout"}
    param_specs = (
        Param(
            "num_blocks", 16, {"type": "integer", "minimum": 1}, "row blocks per layer = how many concepts can merge"
        ),
        Param(
            "erasure",
            0.25,
            {
                "oneOf": [
                    {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}},
                ]
            },
            "lambda of randomized output erasure (0: off); a list gives the paper's lambda_i per concept slot",
        ),
        Param("blockwise", True, {"type": "boolean"}, "false: the paper's ablation without blockwise parameterization"),
    )

    def row_mask(self, ctx):
        if not self.params["blockwise"]:
            return None
        self.check_slots(ctx.slot + 1, "num_blocks")
        return block_mask(ctx.out_features, self.params["num_blocks"], ctx.slot)

    def erasure_rate(self, slot: int) -> float:
        rates = self.params["erasure"]
        if not isinstance(rates, list):
            return float(rates)
        self.check_slots(slot + 1)
        return float(rates[slot])

    def check_slots(self, slots, key="num_blocks"):
        rates = self.params["erasure"]
        if isinstance(rates, list) and slots > len(rates):
            raise MethodError(
                f"method 'blocklora': {slots} concepts need {slots} erasure rates but the erasure list has "
                f"{len(rates)}; give one lambda_i per concept slot (or a single number for every concept)"
            )
        if self.params["blockwise"] and slots > self.params["num_blocks"]:
            raise MethodError(
                f"method 'blocklora': {slots} concepts need {slots} row blocks "
                f"but num_blocks is {self.params['num_blocks']}; "
                f"raise {key} to at least {slots} (each concept owns one block of rows)"
            )


@register_merge
class BlockLoRAMerge(MergeMethod):
    """The merge: W = W0 + sum_i alpha_i (M_i ⊙ B_i) A_i, refusing deltas that share a nonzero row."""

    name = "blocklora"
    weights_sum_to_one = True
    # Eq. 5 writes sum_i alpha_i = 1 ('mean', or a list summing to 1). A constant is also accepted,
    # and 1.0 is the default: the row blocks are disjoint (checked per layer), so with alpha = 1 each
    # concept's rows are exactly its own model, which is what the paper's Figure 5 describes ("only
    # marginal identity loss" up to 15 concepts); with 'mean' they shrink by 1/k and the curve falls
    # by construction. The miniature world chose it: docs/methods.md#blocklora-merge-weights.
    constant_weights = True
    param_specs = (
        weights_param(
            1.0,
            "alpha_i: a constant (default 1.0: each concept's rows exactly its own model), "
            "or 'mean' / a list summing to 1 (Eq. 5 literally)",
        ),
    )
    requirement = "BlockLoRA's merge (paper Eq. 5) requires weights that sum to 1 (a list; or one constant)"

    def check_disjoint(self, layer: str, concepts: Sequence[Concept]) -> list[torch.Tensor]:
        """Raise unless the concepts' deltas change disjoint rows; return each concept's candidate
        rows (where its B is nonzero)."""
        supports = [(concept.adapters[layer].B != 0).any(dim=1) for concept in concepts]
        if len(concepts) < 2 or int(torch.stack(supports).sum(dim=0).max()) <= 1:
            return supports  # fast path: the B rows alone are already disjoint
        for (i, rows_i), (j, rows_j) in combinations(enumerate(supports), 2):
            shared = rows_i & rows_j
            if not shared.any():
                continue
            overlap = nonzero_rows(concepts[i].adapters[layer], shared) & nonzero_rows(
                concepts[j].adapters[layer], shared
            )
            if overlap.any():
                rows = torch.nonzero(overlap).flatten().tolist()
                shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
                raise self.error(
                    f"concepts {concepts[i].name!r} and {concepts[j].name!r} "
                    f"both change rows {shown} ({len(rows)} row(s)) of "
                    f"layer {layer!r}; BlockLoRA merges only deltas of disjoint row blocks (different concept slots)"
                )
        return supports

    def low_rank_terms(self, layer, concepts, weights):
        # B_i is zero outside its rows R_i, so alpha_i s_i B_i[R_i] A_i is alpha_i s_i B_i A_i
        self.check_disjoint(layer, concepts)
        return [(weight, concept.adapters[layer]) for concept, weight in zip(concepts, weights)]

    def merge_layer(self, layer: str, index: int, concepts: Sequence[Concept], weights: list[float]):
        supports = self.check_disjoint(layer, concepts)
        # Each concept contributes only its own rows: alpha_i s_i B_i[R_i] A_i, so a merge costs one
        # LoRA's worth of products (out x r x in) instead of k of them.
        first = concepts[0].adapters[layer]
        merged = torch.zeros(first.B.shape[0], first.A.shape[1], dtype=torch.float32, device=first.A.device)
        for concept, weight, support in zip(concepts, weights, supports):
            adapter = concept.adapters[layer]
            rows = torch.nonzero(support).flatten()
            if weight != 0 and rows.numel():
                merged.index_add_(0, rows, (weight * adapter.scale * adapter.B[rows].float()) @ adapter.A.float())
        return merged
