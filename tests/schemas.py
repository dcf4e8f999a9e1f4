"""A tiny JSON Schema validator for the payload schemas in docs/schemas/ (used by several tests).

jsonschema is not a dependency, so :func:`validate` implements the subset of draft 2020-12 the
schema files use (type, required, properties, additionalProperties, items, const, enum, minimum,
minLength, anyOf). :func:`check_schema_subset` fails when a schema file starts using anything else, so
the validator can never silently ignore a keyword (tests/test_schemas.py checks every file).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
TOPICS = ("state", "telemetry", "twin", "events")
DIALECT = "https://json-schema.org/draft/2020-12/schema"

_ANNOTATIONS = {"$schema", "$id", "title", "description"}
_KEYWORDS = {"type", "required", "properties", "additionalProperties", "items", "const", "enum", "minimum",
             "minLength", "anyOf"}
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    # JSON Schema counts 1.0 as an integer; json.loads never produces one from our payloads anyway.
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def load_schema(topic: str) -> dict[str, Any]:
    """docs/schemas/<topic>.schema.json, parsed."""
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{topic}.schema.json").read_text())
    return schema


def validate(instance: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Every way ``instance`` breaks ``schema``, as "path: problem" strings (empty when valid)."""
    errors: list[str] = []
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](instance) for t in allowed):
            return [f"{path}: expected {' or '.join(allowed)}, got {type(instance).__name__} {instance!r}"]
    if "const" in schema and not _same(instance, schema["const"]):
        errors.append(f"{path}: expected {schema['const']!r}, got {instance!r}")
    if "enum" in schema and not any(_same(instance, option) for option in schema["enum"]):
        errors.append(f"{path}: expected one of {schema['enum']!r}, got {instance!r}")
    if "minimum" in schema and _TYPES["number"](instance) and instance < schema["minimum"]:
        errors.append(f"{path}: expected at least {schema['minimum']}, got {instance!r}")
    if "minLength" in schema and isinstance(instance, str) and len(instance) < schema["minLength"]:
        errors.append(f"{path}: expected at least {schema['minLength']} characters, got {instance!r}")
    if "anyOf" in schema:
        branches = [validate(instance, branch, path) for branch in schema["anyOf"]]
        if all(branches):
            errors.append(f"{path}: matches none of anyOf ({' | '.join('; '.join(b) for b in branches)})")
    if isinstance(instance, dict):
        errors += _validate_object(instance, schema, path)
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _validate_object(instance: dict[str, Any], schema: Mapping[str, Any], path: str) -> list[str]:
    errors = [f"{path}: missing required {key!r}" for key in schema.get("required", []) if key not in instance]
    properties = schema.get("properties", {})
    for key, value in instance.items():
        if key in properties:
            errors += validate(value, properties[key], f"{path}.{key}")
        elif schema.get("additionalProperties", True) is False:
            errors.append(f"{path}: unexpected property {key!r}")
    return errors


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def check_schema_subset(schema: Any, path: str = "$") -> list[str]:
    """Keywords the tiny validator does not implement (it would ignore them), as paths."""
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be an object"]
    problems = [f"{path}: unsupported keyword {key!r}" for key in schema if key not in _KEYWORDS | _ANNOTATIONS]
    for key, sub in schema.get("properties", {}).items():
        problems += check_schema_subset(sub, f"{path}.properties.{key}")
    if "items" in schema:
        problems += check_schema_subset(schema["items"], f"{path}.items")
    for i, branch in enumerate(schema.get("anyOf", [])):
        problems += check_schema_subset(branch, f"{path}.anyOf[{i}]")
    if not isinstance(schema.get("additionalProperties", True), bool):
        problems.append(f"{path}: additionalProperties must be true or false here")
    for t in schema.get("type", []) if isinstance(schema.get("type"), list) else [schema.get("type", "object")]:
        if t not in _TYPES:
            problems.append(f"{path}: unknown type {t!r}")
    return problems


# ------------------------------------------------------------------ telemetry, either version

VERSIONED = ("telemetry.v2",)  # schema files of a later payload version, beside the topics' version 1
Sample = tuple[str, float, Any, str]  # name, ts, value, quality


def telemetry_schema(body: Mapping[str, Any]) -> dict[str, Any]:
    """The schema for a telemetry payload of the version it says it is (1 or 2)."""
    return load_schema("telemetry" if body.get("v") == 1 else f"telemetry.v{body.get('v')}")


def telemetry_samples(body: Mapping[str, Any]) -> list[Sample]:
    """Every sample of a telemetry payload, version 1 or 2, as (name, ts, value, quality) in order.

    Version 2's arrays must be parallel (names, values and a quality array of the same length),
    which JSON Schema cannot say; a payload that breaks that raises ValueError.
    """
    if body["v"] == 1:
        return [(p["name"], p["ts"], p["value"], p["quality"]) for p in body["points"]]
    if body["v"] != 2:
        raise ValueError(f"unknown telemetry version {body['v']!r}")
    out: list[Sample] = []
    for i, read in enumerate(body["reads"]):
        names, values, quality = read["names"], read["values"], read["quality"]
        qualities = [quality] * len(values) if isinstance(quality, str) else quality
        if not len(names) == len(values) == len(qualities):
            raise ValueError(f"reads[{i}]: names, values and quality differ in length "
                             f"({len(names)}, {len(values)}, {len(qualities)})")
        out += [(n, read["ts"], v, q) for n, v, q in zip(names, values, qualities, strict=True)]
    return out
