"""The JSON Schemas in docs/schemas/ describe exactly what edge_agent/cloud/payloads.py produces.

jsonschema is not a dependency, so :func:`validate` implements the subset of draft 2020-12 the
schema files use (type, required, properties, additionalProperties, items, const, enum, minimum,
minLength). :func:`check_schema_subset` fails when a schema file starts using anything else, so
the validator can never silently ignore a keyword. tests/test_sync.py uses it too, on what an
external subscriber (mosquitto_sub) received.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from drivers.base import Reading
from edge_agent.cloud import payloads
from edge_agent.store.messages import Gap, Stamp

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
TOPICS = ("state", "telemetry", "twin", "events")
DIALECT = "https://json-schema.org/draft/2020-12/schema"

_ANNOTATIONS = {"$schema", "$id", "title", "description"}
_KEYWORDS = {"type", "required", "properties", "additionalProperties", "items", "const", "enum", "minimum",
             "minLength"}
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
    if not isinstance(schema.get("additionalProperties", True), bool):
        problems.append(f"{path}: additionalProperties must be true or false here")
    for t in schema.get("type", []) if isinstance(schema.get("type"), list) else [schema.get("type", "object")]:
        if t not in _TYPES:
            problems.append(f"{path}: unknown type {t!r}")
    return problems


# ------------------------------------------------------------------------------------ the files


@pytest.mark.parametrize("topic", TOPICS)
def test_schema_file_is_draft_2020_12_with_id_and_required_fields(topic: str) -> None:
    schema = load_schema(topic)
    assert schema["$schema"] == DIALECT
    assert schema["$id"] == f"urn:edge-agent:payload:{topic}:v1"
    assert schema["type"] == "object" and schema["properties"]["v"]["const"] == 1
    assert {"v", "gateway"} <= set(schema["required"]) <= set(schema["properties"])
    assert f"{{topic_prefix}}/{{site}}/{{gateway_id}}/{topic}" in schema["description"]
    assert check_schema_subset(schema) == []


def test_required_fields_match_the_payloads_module_docstring() -> None:
    expected = {"state": ["v", "gateway", "state", "ts"], "telemetry": ["v", "gateway", "seq", "points"],
                "twin": ["v", "gateway", "ts", "points"], "events": ["v", "gateway", "seq", "ts", "type"]}
    assert {topic: load_schema(topic)["required"] for topic in TOPICS} == expected
    telemetry = load_schema("telemetry")["properties"]
    assert telemetry["points"]["items"]["required"] == ["name", "ts", "value", "quality"]
    assert telemetry["gap"]["required"] == ["from_seq", "to_seq", "messages", "samples"]
    assert load_schema("twin")["properties"]["points"]["items"]["required"] == ["name", "value", "quality", "ts",
                                                                                  "unit"]


def test_schema_files_are_exactly_the_four_topics() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(f"{t}.schema.json" for t in TOPICS)


# ------------------------------------------------------------------------ the validator itself


def test_validator_rejects_what_it_should() -> None:
    schema = load_schema("telemetry")
    good = {"v": 1, "gateway": "gw", "seq": 3, "points": [{"name": "a", "ts": 1.5, "value": 2, "quality": "good"}]}
    assert validate(good, schema) == []
    cases = {
        "$.v: expected 1, got 2": {**good, "v": 2},
        "$: missing required 'seq'": {k: v for k, v in good.items() if k != "seq"},
        "$.seq: expected integer, got bool True": {**good, "seq": True},
        "$.seq: expected at least 1, got 0": {**good, "seq": 0},
        "$: unexpected property 'extra'": {**good, "extra": 1},
        "$.points[0].quality: expected one of ['good', 'uncertain', 'bad', 'stale'], got 'fine'":
            {**good, "points": [{"name": "a", "ts": 1.5, "value": 2, "quality": "fine"}]},
        "$.points[0].value: expected number or boolean or string or null, got list [1]":
            {**good, "points": [{"name": "a", "ts": 1.5, "value": [1], "quality": "good"}]},
        "$.gap: missing required 'samples'": {**good, "gap": {"from_seq": 1, "to_seq": 2, "messages": 2}},
        "$.gateway: expected at least 1 characters, got ''": {**good, "gateway": ""},
    }
    for message, instance in cases.items():
        assert validate(instance, schema) == [message]
    assert validate({**good, "v": True}, schema) == ["$.v: expected 1, got True"]
    assert check_schema_subset({"type": "object", "oneOf": []}) == ["$: unsupported keyword 'oneOf'"]


# ------------------------------------------------------------ payloads.py against the schemas


READINGS = [Reading("pump1.flow", 12.5, "good", 1_700_000_000.25), Reading("pump1.speed", 1450, "good", 1.0),
            Reading("pump1.running", True, "uncertain", 2.0), Reading("line.state", 'say "hi" \u00e9', "stale", 3.0),
            Reading("chiller1.power", math.nan, "bad", 4.0), Reading("chiller1.load", None, "bad", 5.0),
            Reading("chiller1.inf", -math.inf, "good", 6.0)]


def test_telemetry_payloads_validate_and_carry_the_samples() -> None:
    encoder = payloads.TelemetryEncoder("gw-01")
    plain = json.loads(encoder.encode(READINGS, Stamp(7)))
    gapped = json.loads(encoder.encode(READINGS[:1], Stamp(8, Gap(2, 5, 3, 40))))
    empty = json.loads(encoder.encode([], Stamp(9)))
    for body in (plain, gapped, empty):
        assert validate(body, load_schema("telemetry")) == []
    assert plain["seq"] == 7 and "gap" not in plain
    assert [(p["name"], p["value"], p["quality"], p["ts"]) for p in plain["points"]] == [
        ("pump1.flow", 12.5, "good", 1_700_000_000.25), ("pump1.speed", 1450, "good", 1.0),
        ("pump1.running", True, "uncertain", 2.0), ("line.state", 'say "hi" \u00e9', "stale", 3.0),
        ("chiller1.power", None, "bad", 4.0), ("chiller1.load", None, "bad", 5.0), ("chiller1.inf", None, "good", 6.0)]
    assert gapped["gap"] == {"from_seq": 2, "to_seq": 5, "messages": 3, "samples": 40}


def test_state_twin_and_event_payloads_validate() -> None:
    for value in ("online", "offline"):
        body = json.loads(payloads.state("gw-01", value))
        assert validate(body, load_schema("state")) == [] and body["state"] == value
    points = [{"name": "pump1.flow", "value": 12.5, "quality": "good", "ts": 1.0, "unit": "m3/h"},
              {"name": "chiller1.power", "value": math.inf, "quality": "bad", "ts": 2.0, "unit": "kW"},
              {"name": "never.read", "value": None, "quality": "bad", "ts": None, "unit": ""}]
    twin = json.loads(payloads.twin_snapshot("gw-01", points))
    assert validate(twin, load_schema("twin")) == []
    assert [p["value"] for p in twin["points"]] == [12.5, None, None]
    event = json.loads(payloads.event("gw-01", Stamp(4), "anomaly", {"point": "chiller1.vibration", "score": 0.93}))
    assert validate(event, load_schema("events")) == []
    assert (event["seq"], event["type"], event["point"]) == (4, "anomaly", "chiller1.vibration")


def test_schemas_reject_a_payload_from_a_future_version() -> None:
    body = json.loads(payloads.state("gw-01", "online"))
    assert validate({**body, "v": 2}, load_schema("state")) == ["$.v: expected 1, got 2"]
    assert validate({**body, "state": "sleeping"}, load_schema("state")) == [
        "$.state: expected one of ['online', 'offline'], got 'sleeping'"]
