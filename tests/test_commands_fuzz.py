"""Property-based: hostile and malformed payloads straight at the command handler (no MQTT, for speed).

The agent is real (twin, safety gate, the fake device of tests/fakes.py); only the transport is skipped. Properties:
``handle`` never raises; every payload gets a version-1 answer with a documented code; a
well-formed, correctly signed request is always answered under its own id and never fails
with an envelope or authentication code (nor ``internal``); and the agent keeps running.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import string
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent import Agent
from edge_agent.remote import dispatch as commands
from edge_agent.remote import envelope as envelope_mod
from edge_agent.remote.handlers import COMMANDS
from edge_agent.store.views import TwinView
from tests import builders
from tests.fakes import FakePlant

CODES = set(re.findall(r"^([a-z_]+) {2,}", commands.__doc__ or "", re.MULTILINE)) - {"code"}
ENVELOPE_CODES = {"too_large", "bad_json", "missing_field", "bad_field", "unknown_operator", "bad_signature",
                  "bad_validity", "not_yet_valid", "expired", "replayed"}
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()

json_values = st.recursive(  # what JSON can carry (no NaN or infinities)
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=10**400).map(
        lambda n: n * (-1) ** (n % 2)) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
names = st.sampled_from(sorted(COMMANDS)) | st.text(min_size=1, max_size=12)
arg_names = st.sampled_from(["point", "value", "points", "since", "limit", "kind", "event", "mode", "device",
                             "name", "onnx", "sha256", "config"]) | st.text(max_size=8)
args = st.dictionaries(arg_names, json_values | st.sampled_from(["dev.sp", "dev.pv", "10m", "auto", "dev"]),
                       max_size=4)


def sign(body: dict[str, Any], key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return {**body, "sig": base64.b64encode(key.sign(canonical)).decode()}


def well_formed(name: str, arguments: dict[str, Any], operator: str = "root") -> dict[str, Any]:
    now = int(time.time())
    return sign({"id": uuid.uuid4().hex, "name": name, "args": arguments, "operator": operator,
                 "issued_at": now, "expires_at": now + 60})


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    """Bytes, JSON of any shape, envelopes with fields missing, mistyped, tampered or mis-signed."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    operator = draw(st.sampled_from(["root", "viewer", "ghost", ""]))
    envelope = well_formed(draw(names | st.just("")), draw(args), operator)
    if kind == 2:  # drop and retype fields
        for field in draw(st.lists(st.sampled_from(envelope_mod.FIELDS), max_size=3)):
            if draw(st.booleans()):
                envelope.pop(field, None)
            else:
                envelope[field] = draw(json_values)
    elif kind == 3:  # tamper after signing, or sign with another key
        envelope["args"] = {**envelope["args"], "x": draw(json_values | st.floats())}
        if draw(st.booleans()):
            envelope = sign({k: v for k, v in envelope.items() if k != "sig"}, OTHER)
    elif kind == 4:  # hostile time windows
        envelope["issued_at"] = draw(st.floats(allow_nan=False) | st.integers())
        envelope["expires_at"] = draw(st.floats(allow_nan=False) | st.integers())
        envelope = sign({k: v for k, v in envelope.items() if k != "sig"})
    if kind == 6:  # one field inflated towards max_payload, signed or not: the audit keeps a bounded record
        field = draw(st.sampled_from(["operator", "name", "id", "arg key", "arg value"]))
        big = draw(st.sampled_from(["o", "\x1b[2J", "\u202e", "é"])) * draw(st.integers(100, 3000))
        if field == "arg key":
            envelope["args"] = {big: 1}
        elif field == "arg value":
            envelope["args"] = {"point": big}
        else:
            envelope[field] = big
        if draw(st.booleans()):
            envelope = sign({k: v for k, v in envelope.items() if k != "sig"})
    text = json.dumps(envelope)
    if kind == 5:  # raw text surgery: truncation, NaN, lone surrogates, deep nesting
        text = draw(st.sampled_from([text[: len(text) // 2], text.replace('"args": {', '"args": {"n": NaN, '),
                                     text.replace('"name": "', '"name": "\\ud800'), "[" * 5000 + "]" * 5000,
                                     text + draw(st.text(string.printable, max_size=5))]))
    return text.encode()


def check_answer(reply: commands.Reply | None) -> dict[str, Any]:
    assert reply is not None
    body = reply.body
    assert body["v"] == 1 and isinstance(body["ok"], bool)
    json.dumps(body, default=str)  # always serialisable
    if not body["ok"]:
        assert body["error"]["code"] in CODES, body
        assert body["error"]["code"] != "internal", body
    return body


def test_hostile_payloads_never_crash_and_well_formed_ones_are_always_answered(tmp_path: Path) -> None:
    key_file = tmp_path / "root.pub"
    key_file.write_bytes(KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    operators = [builders.operator("root", "admin", key_file), builders.operator("viewer", "viewer", key_file)]
    points = [builders.point("dev.sp", address=0, writable=True, min=0, max=20), builders.point("dev.pv", address=1)]
    doc = builders.config(tmp_path / "data", id="gw-fuzz",
                          commands=builders.commands(operators, max_payload="16KiB", config_deadline="1s"),
                          gate={"readback_timeout": "1s"}, devices=[builders.modbus("dev", points, interval="50ms")])
    path = tmp_path / "agent.toml"
    cfg = builders.load(doc, path)
    text = path.read_text()
    loop = asyncio.new_event_loop()
    agent = Agent(cfg, driver_factory=FakePlant(default=5.0).driver)

    async def start() -> commands.CommandHandler:
        await agent.start()
        handler = commands.CommandHandler(agent, flood_burst=1e9)  # no flood limit: every answer is checked
        handler.attach()
        return handler

    handler = loop.run_until_complete(start())
    fuzz = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    try:
        @fuzz
        @given(payload=hostile())
        def hostile_input(payload: bytes) -> None:
            check_answer(loop.run_until_complete(handler.handle(payload, "re/ply", b"c")))

        @fuzz
        @given(name=names, arguments=args)
        def well_formed_request(name: str, arguments: dict[str, Any]) -> None:
            envelope = well_formed(name, arguments)
            body = check_answer(loop.run_until_complete(handler.handle(json.dumps(envelope).encode())))
            outcomes.add(body["ok"])
            assert body["id"] == envelope["id"]
            if not body["ok"]:
                assert body["error"]["code"] not in ENVELOPE_CODES, body
            if name not in COMMANDS:
                assert body["error"]["code"] == "unknown_command"

        outcomes: set[bool] = set()
        hostile_input()
        well_formed_request()
        assert outcomes == {True, False}  # the generator reached both accepted and refused commands
        # still running: the device task is alive, a ping is answered, the config file is untouched
        assert agent.status().dead_parts == () and agent.status().device("dev") is not None
        ping = check_answer(loop.run_until_complete(handler.handle(json.dumps(well_formed("ping", {})).encode())))
        assert ping["ok"] and ping["result"]["pong"] is True
        assert path.read_text() == text
        # what nobody vouched for is kept as sizes, hashes and short escaped prefixes: bounded records
        loop.run_until_complete(agent.flush())
        assert agent.writer is not None
        loop.run_until_complete(agent.writer.store_records())
        with TwinView.open(agent.config.twin_path) as twin:
            unverified = [e for e in twin.events() if e["kind"] == "command" and e["detail"].get("role") is None]
        assert len(unverified) > 50
        assert max(len(json.dumps(e)) for e in unverified) < 4096
        assert not any("\x1b" in e["message"] or "\u202e" in e["message"] for e in unverified)
    finally:
        loop.run_until_complete(agent.stop())
        loop.close()
