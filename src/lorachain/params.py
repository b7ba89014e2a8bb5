"""Parameter declarations of the continual methods and merges: each parameter is declared once,
as a :class:`Param` in its class's ``params`` tuple, with its default, a JSON-schema fragment of
the values it accepts and a description. From that one declaration come the defaults
(``parameters()``), the checks made when a method or merge is built (:func:`check_values`), and
the parameter blocks of the workflow's config schema (:mod:`lorachain.methods.registry`).

Torch-free and import-light: the workflow reads these while the Snakefile is parsed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match

# Building a method is stricter than the config schema about one thing: an integer parameter
# refuses 2.0 (JSON Schema counts it as an integer; the code indexes and seeds with it).
_STRICT_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)
)
_StrictValidator = validators.extend(Draft202012Validator, type_checker=_STRICT_TYPES)


@dataclass(frozen=True)
class Param:
    """One parameter: its name, default, the JSON-schema fragment of its values and what it means.

    ``shared`` names a ``$defs`` entry: the schema then refers to the fragment as
    ``{"$ref": "#/$defs/<shared>"}`` instead of repeating it in every block (the merges' weights).
    """

    name: str
    default: Any
    schema: dict = field(default_factory=dict)
    description: str = ""
    shared: str | None = None

    def fragment(self, with_default: bool = True) -> dict:
        """The JSON-schema of this parameter as the config schema holds it."""
        base = {"$ref": f"#/$defs/{self.shared}"} if self.shared else dict(self.schema)
        if with_default:
            base["default"] = self.default
        description = self.description if with_default else _with_default(self.description, self.default)
        if description:
            base["description"] = description
        return base

    def problem(self, value) -> str | None:
        """Why `value` is not accepted (None: it is), naming the parameter."""
        error = best_match(_StrictValidator(self.schema).iter_errors(value))
        if error is None:
            return None
        if error.validator == "additionalProperties" and not error.absolute_path:  # a mapping's unknown keys
            unknown = sorted(set(value) - set(self.schema.get("properties", {})))
            return f"parameter {self.name!r} has no key(s) {unknown}; it accepts {sorted(self.schema['properties'])}"
        if error.absolute_path:  # a key inside a mapping: name it and say what it accepts
            name = ".".join([self.name, *(str(part) for part in error.absolute_path)])
            schema = self.schema
            for part in error.absolute_path:
                schema = (
                    schema.get("properties", {}).get(part, {}) if isinstance(part, str) else schema.get("items", {})
                )
            what = f" ({schema['description']})" if schema.get("description") else ""
            return f"parameter {name!r}{what} must be {describe(schema)}, got {error.instance!r}"
        what = f" ({self.description})" if self.description else ""
        return f"parameter {self.name!r}{what} must be {describe(self.schema)}, got {value!r}"


def with_owner(owner: str, problem: str) -> str:
    """ "method 'x' has no parameter(s) ..." / "method 'x': parameter 'p' must be ..." """
    return f"{owner} {problem}" if problem.startswith("has no") else f"{owner}: {problem}"


def _with_default(description: str, default) -> str:
    return f"{description} (default {default!r})" if description else f"default {default!r}"


def defaults(params: Iterable[Param]) -> dict:
    return {param.name: param.default for param in params}


def check_values(params: Sequence[Param], values: dict) -> tuple[dict, list[str]]:
    """(values completed with the defaults, problems); unknown names come first among the problems."""
    declared = {param.name: param for param in params}
    problems = []
    unknown = sorted(set(values) - set(declared))
    if unknown:
        problems.append(f"has no parameter(s) {unknown}; it accepts {sorted(declared) or 'none'}")
    merged = {**defaults(params), **{key: value for key, value in values.items() if key in declared}}
    for name in sorted(set(values) & set(declared)):
        if (problem := declared[name].problem(values[name])) is not None:
            problems.append(problem)
    return merged, problems


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "a boolean",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"))


def describe(schema: dict) -> str:
    """A JSON-schema fragment in words: "an integer >= 1", "one of ['a', 'b']", ..."""
    if "enum" in schema:
        return f"one of {schema['enum']}"
    if "const" in schema:
        return repr(schema["const"])
    if "oneOf" in schema or "anyOf" in schema:
        return " or ".join(describe(option) for option in schema.get("oneOf", schema.get("anyOf")))
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    text = " or ".join(_TYPE_WORDS.get(kind, kind) for kind in kinds) or "a value"
    bounds = [f"{sign} {schema[key]}" for key, sign in _BOUNDS if key in schema]
    if bounds:
        text += " " + " and ".join(bounds)
    if "items" in schema:
        text += f" of {describe(schema['items'])}"
    return text
