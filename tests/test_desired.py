"""Desired state from the cloud, against a real mosquitto with mutual TLS and an in-process agent.

The agent runs on the fake device of tests/fakes.py (its writes land in the test's FakePlant).
Desired documents are signed here with ``cryptography`` directly, the documented way, and
published retained like a cloud application would. The twin snapshot is read on the ``twin``
topic, checked against docs/schemas/twin.schema.json.

The scenario peers get wrong (ThingsBoard IoT Gateway #2124: stale intent re-applied on every
reconnect) is tested as it happens in a plant: the retained document is applied, someone changes
the setpoint at the HMI, then the broker restarts and the agent restarts; the setpoint stays.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import cli
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.store.twin import DesiredDocument, Twin
from edge_agent.store.views import TwinView
from edge_agent.store.writer import INTERRUPTED, TwinWriter
from tests import builders
from tests.fakes import FakePlant
from tests.helpers import wait_for
from tests.mqtt_broker import AGENT_CN, Broker, Message, Pki, Recorder
from tests.schemas import load_schema, validate

PREFIX = "edge/plant-a/gw-01"
DESIRED, TWIN, EVENTS = f"{PREFIX}/desired", f"{PREFIX}/twin", f"{PREFIX}/events"
_ids = itertools.count(1)


@dataclass
class Keys:
    directory: Path
    private: dict[str, Ed25519PrivateKey]


@pytest.fixture(name="keys")
def keys_fixture(tmp_path: Path) -> Keys:
    directory = tmp_path / "keys"
    directory.mkdir()
    private = {}
    for name in ("alice", "bob", "carol", "mallory"):
        private[name] = key = Ed25519PrivateKey.generate()
        (directory / f"{name}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Keys(directory, private)


def agent_config(tmp_path: Path, port: int, pki: Pki, keys: Keys) -> AgentConfig:
    """Operators alice (admin), bob (operator), carol (viewer); device dev with setpoints dev.sp (0..20,
    steps of at most 5) and dev.sp2 (0..20), and the measurement dev.pv. The twin snapshot goes out
    on connect and on a desired-state change only (twin_interval 1h)."""
    operators = [builders.operator(name, role, keys.directory / f"{name}.pub")
                 for name, role in (("alice", "admin"), ("bob", "operator"), ("carol", "viewer"))]
    points = [builders.point("dev.sp", address=0, writable=True, min=0, max=20, max_step=5),
              builders.point("dev.sp2", address=2, writable=True, min=0, max=20),
              builders.point("dev.pv", address=1)]
    dev = builders.modbus("dev", points, interval="100ms", retry_min="100ms", retry_max="200ms")
    doc = builders.config(
        tmp_path / "data", id=AGENT_CN, site="plant-a", twin={"flush_interval": "50ms"},
        mqtt=builders.mqtt(pki, port, publish_interval="100ms", twin_interval="1h", retry_min="100ms",
                           retry_max="500ms"),
        commands=builders.commands(operators, clock_skew="5s"), devices=[dev])
    return builders.load(doc, tmp_path / "agent.toml")


def document(keys: Keys, operator: str, version: Any, points: Any, *, signer: str | None = None,
             name: str = "desired", issued: float | None = None, validity: float = 600) -> dict[str, Any]:
    """A desired document signed the documented way (canonical JSON, Ed25519), not with our code."""
    issued_at = int(time.time() if issued is None else issued)
    body = {"id": f"desired-{next(_ids)}-{time.time_ns()}", "name": name,
            "args": {"version": version, "points": points}, "operator": operator, "issued_at": issued_at,
            "expires_at": issued_at + validity}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    body["sig"] = base64.b64encode(keys.private[signer or operator].sign(canonical)).decode()
    return body


def publish(recorder: Recorder, body: dict[str, Any]) -> str:
    """Publish ``body`` on the desired topic, retained, QoS 1, as the cloud does; returns its id."""
    recorder.publish(DESIRED, json.dumps(body), qos=1, retain=True)
    return str(body["id"])


async def started(cfg: AgentConfig, plant: FakePlant, *, device_up: bool = True) -> Agent:
    agent = Agent(cfg, driver_factory=plant.driver)
    await agent.start()
    assert agent.sync is not None
    link = agent.sync.link
    await wait_for(lambda: link.connected.is_set() and (not device_up or agent.runners["dev"].status.state == "up"),
                   timeout=15, what="agent connected")
    return agent


async def outcome(agent: Agent, state: str, handled: int | None = None) -> Any:
    """The latest document's outcome once it is ``state`` (and ``handled`` documents were checked)."""
    desired = agent.desired
    assert desired is not None
    return await wait_for(lambda: desired.last if desired.last is not None and desired.last.state == state and (
        handled is None or desired.handled == handled) else None, timeout=15, what=f"a document {state}")


async def audit(cfg: AgentConfig, recorder: Recorder, document_id: str, state: str) -> dict[str, Any]:
    """The document's audit record (kind "command"), in the twin and on the events topic."""
    def stored() -> dict[str, Any] | None:
        with TwinView.open(cfg.twin_path) as twin:
            return next((e for e in twin.events() if e["kind"] == "command"
                         and e["detail"].get("command_id") == document_id and e["state"] == state), None)

    event = await wait_for(stored, timeout=10, what=f"audit record of {document_id} ({state})")
    await recorder.wait_for_async(
        lambda ms: any(m.json().get("type") == "command" and m.json().get("command_id") == document_id
                       and m.json().get("state") == state for m in ms), timeout=10, topic=EVENTS)
    return event


def snapshots(messages: list[Message]) -> list[dict[str, Any]]:
    """Every twin snapshot received, each checked against the schema, as {point: desired or None}."""
    schema = load_schema("twin")
    seen = []
    for message in messages:
        body = message.json()
        assert validate(body, schema) == [], body
        seen.append({p["name"]: p.get("desired") for p in body["points"]})
    return seen


def desired_rows(cfg: AgentConfig) -> dict[str, dict[str, Any]]:
    with TwinView.open(cfg.twin_path) as twin:
        return {row["point"]: row for row in twin.desired()}


# ----------------------------------------------------------------------------------- applied


async def test_a_signed_document_goes_through_the_gate_and_the_twin_reports_its_status(
        tmp_path: Path, broker: Broker, pki: Pki, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    plant = FakePlant(default=5.0)
    cfg = agent_config(tmp_path, broker.port, pki, keys)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(cfg, plant)
        try:
            doc_id = publish(recorder, document(keys, "bob", 1, {"dev.sp": 8, "dev.sp2": 12.5}))
            done = await outcome(agent, "applied")
            assert done.results == {"dev.sp": "applied", "dev.sp2": "applied"}
            assert plant.device("dev").written == [("dev.sp", 8.0), ("dev.sp2", 12.5)]
            with TwinView.open(cfg.twin_path) as twin:
                assert [(w["source"], w["actor"], w["point"], w["requested"], w["result"]) for w in twin.writes()] == [
                    ("cloud", "bob", "dev.sp", 8.0, "applied"), ("cloud", "bob", "dev.sp2", 12.5, "applied")]
            applied = {"value": 8.0, "version": 1, "source": "cloud", "status": "applied", "reason": ""}
            await recorder.wait_for_async(lambda ms: any(s["dev.sp"] == applied and s["dev.sp2"] is not None
                                                         and s["dev.sp2"]["status"] == "applied"
                                                         for s in snapshots(ms)), topic=TWIN)
            record = await audit(cfg, recorder, doc_id, "ok")
            detail = record["detail"]
            assert (record["source"], detail["operator"], detail["role"], detail["version"]) == (
                "desired", "bob", "operator", 1)
            assert record["detail"]["results"] == {"dev.sp": "applied", "dev.sp2": "applied"}
        finally:
            await agent.stop()
        # republished on each change of status: pending (waiting for the gate), then applied
        statuses = [s["dev.sp"]["status"] for s in snapshots(recorder.messages(TWIN)) if s["dev.sp"]]
        assert statuses[0] == "pending" and statuses[-1] == "applied", statuses
        assert all(s["dev.pv"] is None for s in snapshots(recorder.messages(TWIN)))  # never asked for: no desired
    with Recorder(broker, TWIN) as late:  # a subscriber that comes later gets the retained snapshot
        retained = await late.wait_for_async(lambda ms: [m for m in ms if m.retain], topic=TWIN)
        assert snapshots(retained)[-1]["dev.sp"] == applied

    assert cli.main(["twin", "show", "--config", str(cfg.source), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["dev.sp"]["desired"] == applied and rows["dev.pv"]["desired"] is None
    assert rows["dev.sp"]["value"] == 8.0
    assert cli.main(["twin", "show", "--config", str(cfg.source)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["point", "value", "quality", "time", "unit", "desired", "desired", "status"]
    line = next(row for row in table if row.startswith("dev.sp "))
    assert line.split()[-4:] == ["8", "applied", "(v1,", "cloud)"]
    assert next(row for row in table if row.startswith("dev.pv ")).split()[-2:] == ["-", "-"]


async def test_a_document_waits_for_a_device_still_connecting_after_a_start(tmp_path: Path, broker: Broker,
                                                                          pki: Pki, keys: Keys) -> None:
    """Published while the gateway was away, the retained document arrives as soon as the link is up,
    before the slow device has delivered any data: it stays pending until then, instead of being
    refused by the gate for want of data (and never tried again)."""
    plant = FakePlant(default=5.0)
    device = plant.device("dev")
    device.connect_open.clear()
    cfg = agent_config(tmp_path, broker.port, pki, keys)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        publish(recorder, document(keys, "bob", 3, {"dev.sp": 7}))
        agent = await started(cfg, plant, device_up=False)
        try:
            assert agent.desired is not None
            await wait_for(lambda: agent.desired is not None and agent.desired.handled == 1, what="document claimed")
            await recorder.wait_for_async(lambda ms: any(s["dev.sp"] is not None and s["dev.sp"]["status"] == "pending"
                                                         for s in snapshots(ms)), topic=TWIN)
            assert agent.runners["dev"].status.state == "connecting" and agent.desired.last is None
            device.connect_open.set()
            done = await outcome(agent, "applied")
            assert done.results == {"dev.sp": "applied"} and device.written == [("dev.sp", 7.0)]
            # the verdict reaches the twin through the writer's queue, a moment after the outcome
            await wait_for(lambda: desired_rows(cfg)["dev.sp"]["status"] == "applied", what="status in the twin")
        finally:
            await agent.stop()


# ----------------------------------------------------------------------------------- refused and ignored


async def test_refused_documents_are_audited_and_write_nothing(tmp_path: Path, broker: Broker, pki: Pki,
                                                               keys: Keys) -> None:
    plant = FakePlant(default=5.0)
    cfg = agent_config(tmp_path, broker.port, pki, keys)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(cfg, plant)
        try:
            tampered = document(keys, "bob", 1, {"dev.sp": 6})
            tampered["args"]["points"]["dev.sp"] = 10
            cases = [
                ("forbidden", document(keys, "carol", 1, {"dev.sp": 6})),  # a viewer
                ("bad_signature", document(keys, "bob", 1, {"dev.sp": 6}, signer="mallory")),
                ("bad_signature", tampered),
                ("unknown_operator", document(keys, "mallory", 1, {"dev.sp": 6})),
                ("bad_field", document(keys, "bob", 1, {"dev.sp": 6}, name="write")),  # a command, not desired state
                ("bad_args", document(keys, "bob", "2", {"dev.sp": 6})),
                ("bad_args", document(keys, "bob", 2, {"dev.sp": "hot"})),
                ("bad_args", document(keys, "bob", 2, [["dev.sp", 6]])),
                ("not_yet_valid", document(keys, "bob", 2, {"dev.sp": 6}, issued=time.time() + 600)),
            ]
            for code, body in cases:
                record = await audit(cfg, recorder, publish(recorder, body), code)
                assert record["detail"]["command"] == "desired" and record["detail"]["ok"] is False
            assert agent.desired is not None and agent.desired.handled == 0
            forbidden = await audit(cfg, recorder, cases[0][1]["id"], "forbidden")
            assert forbidden["message"] == 'carol: desired: forbidden: "desired" needs role operator; "carol" is viewer'
            assert forbidden["detail"]["role"] == "viewer"
            assert plant.device("dev").written == [] and desired_rows(cfg) == {}
            # none of them used up a version: version 1 from an admin is applied
            publish(recorder, document(keys, "alice", 1, {"dev.sp": 6}))
            assert (await outcome(agent, "applied")).results == {"dev.sp": "applied"}
            assert plant.device("dev").written == [("dev.sp", 6.0)]
        finally:
            await agent.stop()


async def test_a_version_not_greater_than_the_last_one_handled_is_ignored(tmp_path: Path, broker: Broker, pki: Pki,
                                                                         keys: Keys) -> None:
    plant = FakePlant(default=5.0)
    cfg = agent_config(tmp_path, broker.port, pki, keys)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(cfg, plant)
        try:
            publish(recorder, document(keys, "bob", 5, {"dev.sp": 7}))
            await outcome(agent, "applied", handled=1)
            older = publish(recorder, document(keys, "bob", 4, {"dev.sp": 9}))
            ignored = await outcome(agent, "ignored", handled=2)
            assert ignored.message == "version 4 is not greater than the last one handled (5); ignored, nothing written"
            await audit(cfg, recorder, older, "stale")
            same = publish(recorder, document(keys, "alice", 5, {"dev.sp": 9}))
            await outcome(agent, "ignored", handled=3)
            await audit(cfg, recorder, same, "stale")
            assert plant.device("dev").written == [("dev.sp", 7.0)]
            assert (desired_rows(cfg)["dev.sp"]["version"], desired_rows(cfg)["dev.sp"]["value"]) == (5, 7.0)
            publish(recorder, document(keys, "bob", 6, {"dev.sp": 9}))
            await outcome(agent, "applied", handled=4)
            assert plant.device("dev").written == [("dev.sp", 7.0), ("dev.sp", 9.0)]
            assert desired_rows(cfg)["dev.sp"]["version"] == 6
        finally:
            await agent.stop()


async def test_the_retained_document_never_writes_again_after_a_broker_or_agent_restart(
        tmp_path: Path, pki: Pki, keys: Keys) -> None:
    """ThingsBoard IoT Gateway #2124: stale intent re-applied on reconnect. Here the setpoint is
    changed at the HMI after the document was applied; neither the broker's re-delivery of the
    retained document after its restart nor the agent's own restart may write it back."""
    plant = FakePlant(default=5.0)
    device = plant.device("dev")
    with Broker(pki, tmp_path / "mosquitto", persistence=True) as broker, \
            Recorder(broker, f"{PREFIX}/#") as recorder:
        cfg = agent_config(tmp_path, broker.port, pki, keys)
        agent = await started(cfg, plant)
        try:
            doc_id = publish(recorder, document(keys, "bob", 1, {"dev.sp": 7}))
            await outcome(agent, "applied", handled=1)
            assert device.written == [("dev.sp", 7.0)]
            device.values["dev.sp"] = 9.0  # an operator at the HMI moves the setpoint
            broker.stop()
            broker.start()
            again = await outcome(agent, "ignored", handled=2)  # re-delivered on resubscription
            assert again.version == 1 and again.code is None  # the same document: quietly ignored
            redelivered = [m for m in recorder.messages(DESIRED) if m.retain]
            assert redelivered and redelivered[-1].json()["id"] == doc_id
        finally:
            await agent.stop()
        assert device.written == [("dev.sp", 7.0)]

        before = len(recorder.messages(TWIN))  # the restarted agent's snapshots come after these
        agent = await started(cfg, plant)
        try:
            await outcome(agent, "ignored", handled=1)  # the restarted agent got the retained document too
            assert device.written == [("dev.sp", 7.0)] and device.values["dev.sp"] == 9.0
            assert desired_rows(cfg)["dev.sp"]["status"] == "applied"
            await recorder.wait_for_async(
                lambda ms: any(s["dev.sp"] is not None and s["dev.sp"]["version"] == 1 for s in snapshots(ms[before:])),
                topic=TWIN)  # the snapshot on connect still reports what became of version 1
        finally:
            await agent.stop()
        with TwinView.open(cfg.twin_path) as twin:
            assert [e["detail"]["command_id"] for e in twin.events() if e["kind"] == "command"] == [doc_id]


async def test_an_expired_document_is_not_applied_and_reported_expired(tmp_path: Path, broker: Broker, pki: Pki,
                                                                      keys: Keys) -> None:
    plant = FakePlant(default=5.0)
    cfg = agent_config(tmp_path, broker.port, pki, keys)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(cfg, plant)
        try:
            body = document(keys, "bob", 3, {"dev.sp": 7}, issued=time.time() - 600, validity=60)
            doc_id = publish(recorder, body)
            await outcome(agent, "expired", handled=1)
            row = desired_rows(cfg)["dev.sp"]
            assert (row["status"], row["version"], row["value"], row["source"], row["actor"]) == (
                "expired", 3, 7.0, "cloud", "bob")
            assert row["reason"].startswith("expired ") and row["reason"].endswith(" s ago")
            await recorder.wait_for_async(lambda ms: any(
                s["dev.sp"] == {"value": 7.0, "version": 3, "source": "cloud", "status": "expired",
                                "reason": row["reason"]} for s in snapshots(ms)), topic=TWIN)
            assert (await audit(cfg, recorder, doc_id, "expired"))["detail"]["version"] == 3
            publish(recorder, body)  # the version was handled: the same document again is ignored
            await outcome(agent, "ignored", handled=2)
            assert plant.device("dev").written == []
        finally:
            await agent.stop()


async def test_points_the_gate_refuses_are_rejected_with_its_reason(tmp_path: Path, broker: Broker, pki: Pki,
                                                                    keys: Keys,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    plant = FakePlant(default=5.0)
    cfg = agent_config(tmp_path, broker.port, pki, keys)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(cfg, plant)
        try:
            publish(recorder, document(keys, "alice", 2, {"dev.sp": 12, "dev.sp2": 30, "dev.pv": 1, "nope": 1,
                                                           "dev.sp ": 6}))
            done = await outcome(agent, "applied")
            assert done.results == {"dev.sp": "rejected", "dev.sp2": "rejected", "dev.pv": "rejected",
                                    "nope": "rejected", "dev.sp ": "rejected"}
            reasons = {"dev.sp": "step +7 is larger than max_step 5",
                       "dev.sp2": "30 is outside the safe range 0..20",
                       "dev.pv": '"dev.pv" is not writable (writable = true is not set)'}
            rows = desired_rows(cfg)
            assert {p: (r["status"], r["reason"], r["version"]) for p, r in rows.items()} == {
                p: ("rejected", reason, 2) for p, reason in reasons.items()}  # no desired state for unknown points
            with TwinView.open(cfg.twin_path) as twin:
                assert {(w["point"], w["reason"]) for w in twin.writes()} >= {
                    ("nope", 'no point named "nope"'), *reasons.items()}
            await recorder.wait_for_async(lambda ms: any(all(
                s[p] is not None and (s[p]["status"], s[p]["reason"]) == ("rejected", r) for p, r in reasons.items())
                for s in snapshots(ms)), topic=TWIN)
            assert plant.device("dev").written == []
        finally:
            await agent.stop()
    assert cli.main(["twin", "show", "--config", str(cfg.source)]) == 0
    out = capsys.readouterr().out
    assert "dev.sp: desired 12 rejected: step +7 is larger than max_step 5" in out
    assert "dev.sp2: desired 30 rejected: 30 is outside the safe range 0..20" in out


# ----------------------------------------------------------------------------------- the store


def test_the_last_version_survives_and_pending_points_left_by_a_stop_become_failed(tmp_path: Path) -> None:
    cfg = builders.load(builders.config(tmp_path, devices=[builders.modbus("dev", [
        builders.point("dev.sp", address=0, writable=True, min=0, max=20)])]), tmp_path / "agent.toml")
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    doc = DesiredDocument(4, "doc-4", "bob", 100.0, 200.0, 150.0, {"dev.sp": 7, "other.sp": 1}, "pending")
    assert twin.claim_desired(doc).accepted
    twin.close()  # the agent stops (or dies) before the gate answered

    twin = Twin.open(cfg.twin_path)
    writer = TwinWriter(twin, cfg.twin)
    writer.restore()
    failed = {"value": 7.0, "version": 4, "source": "cloud", "status": "failed", "reason": INTERRUPTED}
    assert writer.desired == {"dev.sp": failed}  # not other.sp: not a point of this gateway
    claim = twin.claim_desired(DesiredDocument(4, "doc-4b", "bob", 100.0, 200.0, 160.0, {"dev.sp": 9}, "pending"))
    assert (claim.accepted, claim.last_version, claim.last_id) == (False, 4, "doc-4")
    assert twin.desired_state() == {"dev.sp": failed}
    newer = twin.claim_desired(DesiredDocument(5, "doc-5", "bob", 100.0, 200.0, 170.0, {"dev.sp": 9}, "pending"))
    assert (newer.accepted, newer.last_version, newer.last_id) == (True, 4, "doc-4")
    assert twin.desired_state(["dev.sp"])["dev.sp"]["status"] == "pending"
    twin.close()


async def test_a_verdict_still_queued_never_overwrites_a_newer_document(tmp_path: Path) -> None:
    """Version 1's verdict is queued in the writer when version 2 is claimed: it is stored first, so
    the point shows version 2 pending, not version 1's value as if version 2 were applied."""
    cfg = builders.load(builders.config(tmp_path, devices=[builders.modbus("dev", [
        builders.point("dev.sp", address=0, writable=True, min=0, max=20)])]), tmp_path / "agent.toml")
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    writer = TwinWriter(twin, cfg.twin)
    changes: list[int] = []
    writer.on_desired = lambda: changes.append(1)
    first = DesiredDocument(1, "doc-1", "bob", 100.0, 200.0, 150.0, {"dev.sp": 7}, "pending")
    assert (await writer.claim_desired(first)).accepted
    assert writer.desired["dev.sp"]["status"] == "pending" and changes == [1]
    writer.record("write", {"ts": 151.0, "source": "cloud", "actor": "bob", "point": "dev.sp", "old": 5.0,
                            "requested": 7.0, "written": 7.0, "readback": 7.0, "result": "applied", "reason": ""})
    second = DesiredDocument(2, "doc-2", "bob", 100.0, 200.0, 152.0, {"dev.sp": 9}, "pending")
    assert (await writer.claim_desired(second)).accepted
    pending = {"value": 9.0, "version": 2, "source": "cloud", "status": "pending", "reason": ""}
    assert writer.desired["dev.sp"] == pending == twin.desired_state()["dev.sp"]
    assert twin.conn.execute("SELECT point, result FROM writes").fetchall() == [("dev.sp", "applied")]
    writer.record("write", {"ts": 153.0, "source": "cloud", "actor": "bob", "point": "dev.sp", "old": 7.0,
                            "requested": 9.0, "written": 9.0, "readback": 9.0, "result": "applied", "reason": ""})
    writer.record("write", {"ts": 154.0, "source": "operator", "actor": "alice", "point": "dev.sp", "old": 9.0,
                            "requested": 8.0, "written": 8.0, "readback": 8.0, "result": "applied", "reason": ""})
    await writer.store_records()
    assert writer.desired["dev.sp"] == {"value": 8.0, "version": 3, "source": "operator", "status": "applied",
                                        "reason": ""}  # an operator's write counts on from the document's version
    assert len(changes) == 5
    await writer.close()


async def test_an_unverified_document_costs_a_bounded_audit_record(tmp_path: Path, broker: Broker, pki: Pki,
                                                                   keys: Keys) -> None:
    """Issue 11's rule holds on the desired topic too: a document nobody vouched for is audited with sizes,
    hashes and short prefixes, never its fields (a 700 KB operator name used to be copied whole)."""
    plant = FakePlant(default=5.0)
    cfg = agent_config(tmp_path, broker.port, pki, keys)
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = await started(cfg, plant)
        try:
            huge = "m" * 700_000
            body = document(keys, "bob", 1, {f"dev.{'p' * 50_000}": 1.0})
            body["operator"] = huge  # the signature no longer matters: no such operator
            record = await audit(cfg, recorder, publish(recorder, body), "unknown_operator")
            stored = json.dumps(record)
            assert len(stored) < 4_000, len(stored)
            assert record["detail"]["operator"]["bytes"] == 700_000
            assert huge[:200] not in record["message"] and len(record["message"]) < 400  # a short prefix only
            assert plant.device("dev").written == []
        finally:
            await agent.stop()
