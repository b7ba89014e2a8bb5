"""What the workflow asks of the registries: the config schema's method and merge blocks, built
from the classes' parameter declarations, and plugins that add methods from outside lorachain.

:func:`schema_defs` returns the ``$defs`` entries ``method_block``, ``merge_block`` and the shared
fragments (``merge_weights``) that ``workflow/schemas/config.schema.yaml`` refers to;
:func:`lorachain.config_checks.validate_config` inserts them before validating. A method block is
``{method: <name>, <parameter>: <value>, ...}`` with one ``if``/``then`` per registered method that
allows exactly that method's parameters, with their types, ranges, defaults and descriptions.
Merge blocks add ``adapters`` (the modular adapter label whose LoRAs are merged); their defaults
are named in the descriptions but not filled into the config (the merge jobs' parameters are what
the config states; the merge class completes them).

A plugin (config key ``plugins``) is an importable module name or the path of a ``.py`` file whose
classes use ``@register_method`` / ``@register_merge``; :func:`load_plugins` imports it (a file
under a module name derived from its absolute path, so that loading it twice imports it once).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

from lorachain.methods.base import COMMON_PARAMS, method_class, method_names
from lorachain.methods.merge_base import merge_class, merge_names
from lorachain.params import Param

LABEL_PATTERN = "^[A-Za-z][A-Za-z0-9_]*$"


class PluginError(ValueError):
    """A plugin that cannot be imported; the message names the config key."""


def _then(fixed: Sequence[str], params: Iterable[Param], with_default: bool, common: Iterable[Param] = ()) -> dict:
    """The properties a block of one class allows: `fixed` names, the class's own parameters and
    the `common` ones (every method's, off by default: their defaults are not filled in)."""
    properties = {name: {} for name in fixed}
    properties.update({param.name: param.fragment(with_default) for param in params})
    properties.update({param.name: param.fragment(with_default=False) for param in common})
    return {"additionalProperties": False, "properties": properties}


def _if_method(name: str) -> dict:
    return {"properties": {"method": {"const": name}}}


def method_block() -> dict:
    """The schema of a block under ``methods`` or ``modular.adapters``."""
    names = method_names()
    return {
        "type": "object",
        "required": ["method"],
        "properties": {"method": {"type": "string", "enum": names}},
        "allOf": [
            {"if": _if_method(name), "then": _then(["method"], method_class(name).param_specs, True, COMMON_PARAMS)}
            for name in names
        ],
    }


def merge_block() -> dict:
    """The schema of a block under ``modular.merges``."""
    names = merge_names()
    return {
        "type": "object",
        "required": ["method", "adapters"],
        "properties": {
            "method": {"type": "string", "enum": names},
            "adapters": {"type": "string", "description": "the label under modular.adapters whose LoRAs are merged"},
        },
        "allOf": [
            {"if": _if_method(name), "then": _then(["method", "adapters"], merge_class(name).param_specs, False)}
            for name in names
        ],
    }


def shared_defs() -> dict:
    """The fragments that parameters share by name (``Param.shared``), e.g. ``merge_weights``."""
    shared: dict[str, dict] = {}
    classes = [method_class(name) for name in method_names()] + [merge_class(name) for name in merge_names()]
    for cls in classes:
        for param in cls.param_specs:
            if param.shared is None:
                continue
            if shared.setdefault(param.shared, param.schema) != param.schema:
                raise RuntimeError(
                    f"{cls.__name__}: parameter {param.name!r} declares $defs/{param.shared} "
                    "differently from another class"
                )
    return shared


def schema_defs() -> dict:
    """``$defs`` of the config schema: ``method_block``, ``merge_block`` and the shared fragments."""
    return {"method_block": method_block(), "merge_block": merge_block(), **shared_defs()}


def plugin_module_name(path: Path) -> str:
    """The module name a plugin file is imported under: its stem and a digest of its absolute path."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"lorachain_plugin_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def _import_file(path: Path, key: str) -> ModuleType:
    name = plugin_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise PluginError(f"config key {key}: importing {path} failed ({type(error).__name__}: {error})") from error
    return module


def load_plugin(name: str, key: str = "plugins") -> ModuleType:
    """Import one plugin: a module name, or a ``.py`` file (relative paths from the working directory)."""
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise PluginError(
                f"config key {key}: {name!r} is not a file; give the path of a .py file "
                f"(relative paths are read from {Path.cwd()}) or a module name"
            )
        return _import_file(path, key)
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise PluginError(
            f"config key {key}: cannot import module {name!r} ({type(error).__name__}: {error}); "
            "give an importable module name or the path of a .py file"
        ) from error


def load_plugins(names: Sequence[str], key: str = "plugins") -> list[ModuleType]:
    """Import every plugin (config key ``plugins``) so that its methods and merges register."""
    return [load_plugin(str(name), f"{key}[{index}]") for index, name in enumerate(names)]
