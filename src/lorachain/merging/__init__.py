"""Tools around the merges that are not merge methods themselves.

The merge methods live with the continual methods in :mod:`lorachain.methods` (one module per
paper method, training and merge side together; registry: :func:`lorachain.methods.make_merge`),
and the LoRA file reader in :mod:`lorachain.lora`. Here: :mod:`lorachain.merging.diagnostics`
measures cosine similarity and sign conflicts between deltas (BlockLoRA paper, Figure 4), and
:mod:`lorachain.merging.fusion` records layer inputs (Grams) and solves gradient fusion's
closed form.
"""
