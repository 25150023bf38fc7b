"""Estimator options, declared once per estimator class and checked with JSON Schema.

Each estimator lists its options as `options = {name: Option(...)}`. From that one declaration come the
defaults, `neuclip methods --options`, the check that `neuclip train` and the workflow's preflight run before a
run folder exists, and the set of keys that an experiment's `common_options` may set once for every method
(`shared=True`). Checks use JSON Schema, the same system as the experiment and train configs, so every layer
reports problems the same way: the key, what it must be, the value found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jsonschema


class OptionError(ValueError):
    """An estimator option that is unknown, of the wrong type or out of range; the message names the key."""


@dataclass(frozen=True)
class Option:
    default: Any
    schema: dict  # JSON Schema of the value (null is allowed only when the schema says so)
    help: str = ""
    shared: bool = False  # may be set once for every method in an experiment's `common_options`
    extra: dict = field(default_factory=dict)


def _nullable(schema: dict, nullable: bool) -> dict:
    if not nullable:
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def integer(default, help="", *, minimum=None, maximum=None, nullable=False, shared=False) -> Option:
    schema: dict = {"type": "integer"}
    if minimum is not None:
        schema["minimum"] = minimum
    if maximum is not None:
        schema["maximum"] = maximum
    return Option(default, _nullable(schema, nullable), help, shared)


def number(default, help="", *, minimum=None, exclusive_minimum=None, maximum=None, nullable=False,
           shared=False) -> Option:
    schema: dict = {"type": "number"}
    for key, value in (("minimum", minimum), ("exclusiveMinimum", exclusive_minimum), ("maximum", maximum)):
        if value is not None:
            schema[key] = value
    return Option(default, _nullable(schema, nullable), help, shared)


def boolean(default, help="", *, shared=False) -> Option:
    return Option(default, {"type": "boolean"}, help, shared)


def choice(default, choices, help="", *, shared=False) -> Option:
    return Option(default, {"enum": list(choices)}, help, shared)


def fraction_pair(default, help="") -> Option:
    """Two numbers in [0, 1), e.g. Adam betas."""
    item = {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
    return Option(default, {"type": "array", "items": item, "minItems": 2, "maxItems": 2}, help)


def schema_of(options: dict[str, Option]) -> dict:
    """The JSON Schema of a whole options mapping (unknown keys are errors)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: opt.schema for name, opt in options.items()},
    }


def describe(schema: dict) -> str:
    """A short human reading of a value schema: 'an integer >= 1', 'one of a, b', 'a number or null'."""
    if "anyOf" in schema:
        return " or ".join(describe(s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(map(str, schema["enum"]))
    kind = schema.get("type")
    words = {"integer": "an integer", "number": "a number", "boolean": "true or false", "null": "null",
             "array": "a list", "string": "a string", "object": "a mapping"}.get(kind, str(kind))
    bounds = [f">= {schema['minimum']}"] if "minimum" in schema else []
    bounds += [f"> {schema['exclusiveMinimum']}"] if "exclusiveMinimum" in schema else []
    bounds += [f"<= {schema['maximum']}"] if "maximum" in schema else []
    bounds += [f"< {schema['exclusiveMaximum']}"] if "exclusiveMaximum" in schema else []
    if kind == "array" and "items" in schema:
        fixed = "minItems" in schema and schema["minItems"] == schema.get("maxItems")
        count = f"{schema['minItems']} " if fixed else ""
        words = f"a list of {count}items, each {describe(schema['items'])}"
    return words + (" " + " and ".join(bounds) if bounds else "")


def check(method: str, options: dict, declared: dict[str, Option], where: str = "method.options") -> None:
    """Raise OptionError naming the first bad key of `options` (checked against `declared`)."""
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise OptionError(
            f"{where}: unknown option(s) {unknown} for method {method!r}; known options: {', '.join(sorted(declared))}"
        )
    for name, value in options.items():
        schema = declared[name].schema
        if not jsonschema.Draft202012Validator(schema).is_valid(_plain(value)):
            raise OptionError(f"{where}.{name} of method {method!r} must be {describe(schema)}, got {value!r}")


def _plain(value):
    """Tuples as lists (JSON has no tuples); YAML may give either."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
