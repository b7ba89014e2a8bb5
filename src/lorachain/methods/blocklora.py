"""BlockLoRA (BlockLoRA paper, Eq. 3-5): randomized output erasure and blockwise parameterization.

Training the LoRA of concept slot k: h = W0 x + r(lambda) ⊙ ((M_k ⊙ B_k) A_k x) * alpha / r, where
r(lambda) is a fresh Bernoulli(1 - lambda) mask over the output features at every forward pass
(training only; the paper gives no lambda, so ``erasure`` is a parameter; erased outputs are not
rescaled, as in the paper's equation) and M_k keeps the k-th of ``num_blocks`` contiguous row blocks
of the output dimension (:func:`lorachain.merging.blocklora.block_rows`). Rows of B outside the
block start at zero and stay exactly zero. Deltas of different slots touch disjoint rows: zero
cosine similarity and no sign conflicts when merged.

``blockwise: false`` and ``erasure: 0`` are the paper's ablations (its Table 3). In a continual
chain the slot is the task index - 1 and the state after a task is the sum of the deltas.
"""

from lorachain.methods.base import ContinualMethod, MethodError, register_method


@register_method
class BlockLoRA(ContinualMethod):
    name = "blocklora"

    @classmethod
    def parameters(cls):
        return {"num_blocks": 16, "erasure": 0.25, "blockwise": True}

    def __init__(self, **params):
        super().__init__(**params)
        blocks, erasure = self.params["num_blocks"], self.params["erasure"]
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise MethodError(f"method 'blocklora': num_blocks must be an integer >= 1, got {blocks!r}")
        if not isinstance(erasure, (int, float)) or not 0 <= erasure < 1:
            raise MethodError(f"method 'blocklora': erasure (lambda) must lie in [0, 1), got {erasure!r}")

    def row_mask(self, ctx):
        if not self.params["blockwise"]:
            return None
        from lorachain.merging.blocklora import block_mask  # lazily: lorachain.merging imports this package

        self.check_slots(ctx.slot + 1, "num_blocks")
        return block_mask(ctx.out_features, self.params["num_blocks"], ctx.slot)

    def erasure_rate(self):
        return float(self.params["erasure"])

    def check_slots(self, slots, key="num_blocks"):
        if self.params["blockwise"] and slots > self.params["num_blocks"]:
            raise MethodError(
                f"method 'blocklora': {slots} concepts need {slots} row blocks but num_blocks is {self.params['num_blocks']}; "
                f"raise {key} to at least {slots} (each concept owns one block of rows)"
            )
