"""The trainer's parts, by responsibility; :mod:`lorachain.train` runs them as one task's phases.

* :mod:`.config`: the ``training`` config block, the trainer's errors and the per-task seed rule.
* :mod:`.conditioning`: training images, prompt encoding and the U-Net's conditioning arguments
  (shared with :mod:`lorachain.modular`).
* :mod:`.adapters`: the targeted layers, the method's initial factors, peft injection, output
  erasure, and the trained factors read back.
* :mod:`.resume`: in-task checkpoints (run fingerprint, atomic safetensors files, validation) and
  deferred SIGTERM.
"""
