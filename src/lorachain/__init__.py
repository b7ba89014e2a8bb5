"""lorachain: continual and modular LoRA personalisation of text-to-image diffusion models.

Importing a submodule that needs torch goes through :mod:`lorachain._compat` first (see there);
the package root itself stays import-light so that workflow steps without torch start fast.
"""

__version__ = "0.1.0"
