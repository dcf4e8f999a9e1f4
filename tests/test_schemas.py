"""The JSON Schemas in docs/schemas/ describe exactly what edge_agent/cloud/payloads.py produces.

The validator is tests/schemas.py (a subset of draft 2020-12, no jsonschema dependency); these
tests check the schema files, the validator itself, and payloads.py against the schemas.
tests/test_sync.py uses the validator too, on what an external subscriber (mosquitto_sub) received.
"""

from __future__ import annotations

import json
import math

import pytest

from drivers.base import Reading
from edge_agent.cloud import payloads
from edge_agent.store.messages import Gap, Stamp
from tests.schemas import DIALECT, SCHEMA_DIR, TOPICS, VERSIONED, check_schema_subset, load_schema, validate

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


def test_schema_files_are_exactly_the_four_topics_and_telemetry_v2() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(f"{t}.schema.json" for t in TOPICS + VERSIONED)


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
    assert check_schema_subset({"anyOf": [{"enum": [1]}, {"type": "array", "not": {}}]}) == [
        "$.anyOf[1]: unsupported keyword 'not'"]
    either = {"anyOf": [{"enum": ["good"]}, {"type": "array", "items": {"enum": ["good"]}}]}
    assert validate("good", either) == [] and validate(["good", "good"], either) == []
    assert validate("fine", either) == ["$: matches none of anyOf ($: expected one of ['good'], got 'fine' | "
                                        "$: expected array, got str 'fine')"]


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


def test_twin_payload_with_desired_state_validates() -> None:
    """A point with a desired state carries exactly value, version, source, status and reason."""
    schema = load_schema("twin")
    statuses = ["pending", "applied", "rejected", "failed", "rolled_back", "expired"]
    points = [{"name": f"p{i}", "value": 5.0, "quality": "good", "ts": 1.0, "unit": "",
               "desired": {"value": 7.5, "version": 3, "source": "cloud", "status": status, "reason": ""}}
              for i, status in enumerate(statuses)]
    points.append({"name": "never.asked", "value": 1.0, "quality": "good", "ts": 1.0, "unit": "", "desired": None})
    twin = json.loads(payloads.twin_snapshot("gw-01", points))
    assert validate(twin, schema) == []
    assert [p.get("desired", {}).get("status") for p in twin["points"]] == [*statuses, None]
    assert "desired" not in twin["points"][-1]
    desired = twin["points"][0]["desired"]
    assert desired == {"value": 7.5, "version": 3, "source": "cloud", "status": "pending", "reason": ""}
    assert load_schema("twin")["properties"]["points"]["items"]["properties"]["desired"]["required"] == [
        "value", "version", "source", "status", "reason"]
    bad = json.loads(json.dumps(twin))
    bad["points"][0]["desired"] = {**desired, "status": "done", "by": "x"}
    assert validate(bad, schema) == ["$.points[0].desired.status: expected one of "
                                     f"{['pending', 'applied', 'rejected', 'failed', 'rolled_back', 'expired']!r}, "
                                     "got 'done'", "$.points[0].desired: unexpected property 'by'"]
