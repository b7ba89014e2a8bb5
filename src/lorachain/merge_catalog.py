"""What the workflow needs to know about merge methods at DAG-building time, without importing
torch: which merges need each concept's recorded layer inputs (a test keeps this equal to the
registry's ``needs_layer_inputs``)."""

NEEDS_LAYER_INPUTS = frozenset({"gradient_fusion"})
