"""The Sparkplug B 3.0 edge node against a real mosquitto, every payload read back with Eclipse Tahu's own
JavaScript codec (tests/tahu.py), not with the agent's code: births, seq, bdSeq, the NDEATH Will after a
kill -9, historical replay after an outage, rebirth, DDEATH/DBIRTH, DCMD writes, a primary host's STATE."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.cloud import sparkplug as spb
from edge_agent.cloud import sparkplug_b_pb2 as pb
from edge_agent.config import ModbusPoint, OpcUaPoint
from edge_agent.errors import ConfigError, LinkError
from tests import builders
from tests.fakes import FakePlant
from tests.helpers import free_port, reader, wait_for, wait_for_sync
from tests.mqtt_broker import Broker, Message, Pki, Recorder
from tests.tahu import Tahu
from tests.unavailable import unavailable

GROUP, NODE = "plant-a", "gw-01"
NS = f"spBv1.0/{GROUP}"
NBIRTH, NDEATH, NCMD = (f"{NS}/{verb}/{NODE}" for verb in ("NBIRTH", "NDEATH", "NCMD"))


def dtopic(verb: str, device: str) -> str:
    return f"{NS}/{verb}/{NODE}/{device}"


@pytest.fixture(scope="module")
def tahu() -> Iterator[Tahu]:
    with Tahu() as codec:
        yield codec


def sp_config(tmp_path: Path, broker: Broker, pki: Pki, *, sparkplug: builders.Doc | None = None,
              devices: list[builders.Doc] | None = None, mqtt: builders.Doc | None = None) -> config.AgentConfig:
    section = builders.mqtt(pki, broker.port, publish_interval="100ms", twin_interval="1s", retry_min="100ms",
                            retry_max="300ms", **(mqtt or {}))
    devices = devices or [builders.modbus("dev", builders.numbered("dev.p", 3, unit="bar"), interval="100ms")]
    doc = builders.config(tmp_path / "data", id=NODE, site=GROUP, twin={"flush_interval": "50ms"}, mqtt=section,
                          sparkplug={"enabled": True, **(sparkplug or {})}, devices=devices)
    return builders.load(doc, tmp_path / "agent.toml")


def setpoint_device(**options: Any) -> builders.Doc:
    return builders.modbus("pump", [builders.point("pump.sp", address=0, type="float32", writable=True, min=0.0,
                                                   max=100.0, unit="%")], interval="100ms", **options)


def node_messages(recorder: Recorder) -> list[Message]:
    """What the edge node published, in the order received (commands and STATE left out)."""
    return [m for m in recorder.messages(f"{NS}/#") if spb.verb(m.topic) not in ("NCMD", "DCMD", "")]


def decoded(tahu: Tahu, messages: list[Message]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(spb.verb(m.topic), m.topic, tahu.decode(m.payload)) for m in messages]


def metric(payload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in payload["metrics"] if m.get("name") == name)


def assert_seq_runs(stream: list[tuple[str, str, dict[str, Any]]]) -> None:
    """seq starts at 0 on each NBIRTH and grows by one per message, 255 -> 0; NDEATH has none."""
    expected = None
    for kind, topic, payload in stream:
        if kind == "NDEATH":
            assert "seq" not in payload, (topic, payload)
            expected = None
            continue
        if kind == "NBIRTH":
            assert payload["seq"] == 0, payload
        elif expected is not None:
            assert payload["seq"] == expected, (topic, payload["seq"], expected)
        expected = (payload["seq"] + 1) % 256


# ---------------------------------------------------------------------------------------- config


def test_config_defaults_come_from_agent_and_mqtt(tmp_path: Path, pki: Pki) -> None:
    doc = builders.config(tmp_path, id="gw-9", site="north", mqtt=builders.mqtt(pki, 8883, client_id="gw-9-c"),
                          sparkplug={"enabled": True},
                          devices=[builders.modbus("dev", [builders.point("a", address=0)])])
    settings_ = builders.load(doc, tmp_path / "agent.toml").sparkplug
    assert (settings_.group_id, settings_.edge_node_id, settings_.client_id) == ("north", "gw-9", "gw-9-c-sparkplug")
    assert settings_.accept_writes is False and settings_.primary_host == ""
    assert config.loads("[agent]\nid = 'x'\n", tmp_path / "a.toml").sparkplug.enabled is False


def test_config_refuses_what_cannot_be_a_sparkplug_id(tmp_path: Path) -> None:
    doc = builders.config(tmp_path, id="gw", sparkplug={"enabled": True, "group_id": "a/b", "primary_host": "x+"},
                          devices=[builders.modbus("pump#1", [builders.point("p", address=0)])])
    with pytest.raises(ConfigError) as caught:
        builders.load(doc, tmp_path / "agent.toml")
    problems = "\n".join(caught.value.problems)
    assert 'sparkplug.group_id: expected a Sparkplug id without "/", "+" or "#"' in problems
    assert "sparkplug.primary_host: expected a Sparkplug id" in problems
    assert 'devices[0].name "pump#1" cannot be a Sparkplug device id' in problems
    assert "sparkplug.enabled: Sparkplug needs the broker settings of an [mqtt] section" in problems


# ---------------------------------------------------------------------------------------- payloads


def test_the_vendored_code_is_generated_from_the_vendored_proto(tmp_path: Path) -> None:
    import shutil

    from google.protobuf import descriptor_pb2

    protoc = shutil.which("protoc")
    if protoc is None:
        unavailable("protoc is not installed (Debian: protobuf-compiler; ./dev.sh test installs it)")
    proto = Path(spb.__file__).with_name("sparkplug_b.proto")
    subprocess.run([protoc, f"--proto_path={proto.parent}", f"--descriptor_set_out={tmp_path / 'set.pb'}",
                    proto.name], check=True, timeout=60)
    built = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes()).file[0]

    def strip_json_names(messages: Any) -> None:  # a descriptor set names them; generated code leaves them out
        for message in messages:
            for field in message.field:
                field.ClearField("json_name")
            strip_json_names(message.nested_type)

    strip_json_names(built.message_type)
    assert built == descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert "Eclipse Public License 2.0" in proto.read_text()  # vendored unchanged, licence header kept


def test_tahu_reads_every_datatype_as_we_meant_it(tahu: Tahu) -> None:
    now = time.time()
    samples = [spb.Sample("i16", spb.INT16, -5, "good", now), spb.Sample("u16", spb.UINT16, 65535, "good", now),
               spb.Sample("i32", spb.INT32, -2**31, "good", now), spb.Sample("i64", spb.INT64, -2**40, "good", now),
               spb.Sample("u64", spb.UINT64, 2**64 - 1, "good", now), spb.Sample("d", spb.DOUBLE, 21.5, "stale", now),
               spb.Sample("b", spb.BOOLEAN, True, "bad", now), spb.Sample("s", spb.STRING, "run <ok> & \u00e9", "good",
                                                                          now),
               spb.Sample("n", spb.DOUBLE, None, "bad", now + 1)]
    payload = tahu.decode(spb.with_seq(spb.dbirth(samples), 7))
    assert payload["seq"] == 7 and abs(payload["timestamp"] - now * 1000) < 5000
    by_name = {m["name"]: m for m in payload["metrics"]}
    assert {k: (m["type"], m.get("value")) for k, m in by_name.items() if k != "n"} == {
        "i16": ("Int16", -5), "u16": ("UInt16", 65535), "i32": ("Int32", -2**31), "i64": ("Int64", -2**40),
        "u64": ("UInt64", 2**64 - 1), "d": ("Double", 21.5), "b": ("Boolean", True), "s": ("String", "run <ok> & é")}
    assert by_name["n"]["type"] == "Double" and by_name["n"]["value"] is None  # Tahu reads is_null as null
    assert [m["name"] for m in payload["metrics"]][-1] == "n"  # chronological: the later sample last
    quality = {k: m["properties"]["Quality"] for k, m in by_name.items()}
    assert quality["d"] == {"type": "Int32", "value": 500} and quality["b"]["value"] == 0
    assert quality["i16"]["value"] == 192 and by_name["i16"]["timestamp"] == round(now * 1000)
    data = tahu.decode(spb.with_seq(spb.as_historical(spb.ddata(samples[:2])), 255))
    assert data["seq"] == 255 and all(m["isHistorical"] is True for m in data["metrics"])
    assert all("type" not in m or m["type"] in ("Int16", "UInt16") for m in data["metrics"])


def test_commands_built_by_tahu_are_read_with_the_born_datatype(tahu: Tahu) -> None:
    raw = tahu.encode({"timestamp": 1, "metrics": [
        {"name": "a", "type": "Int16", "value": -7}, {"name": "b", "type": "Double", "value": 7.25},
        {"name": "c", "type": "Boolean", "value": True}, {"name": "d", "type": "Int64", "value": -3},
        {"name": "e", "type": "String", "value": "x"}]})
    commands = {c.name: c for c in spb.decode_command(raw)}
    assert spb.command_value(commands["a"], spb.INT16) == -7
    assert spb.command_value(commands["b"], spb.DOUBLE) == 7.25
    assert spb.command_value(commands["c"], spb.BOOLEAN) is True
    assert spb.command_value(commands["d"], spb.INT64) == -3
    assert spb.command_value(commands["e"], spb.DOUBLE) == "x"  # left to the safety gate to refuse


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_link_error(data: bytes) -> None:
    try:
        commands = spb.decode_command(data)
    except LinkError:
        return
    assert all(isinstance(c.name, str) for c in commands)


def test_datatypes_follow_the_config_then_the_value() -> None:
    assert spb.datatype_for(ModbusPoint(name="a", address=0, type="int16"), 3) == spb.INT16
    assert spb.datatype_for(ModbusPoint(name="a", address=0, type="int16", scale=0.1), 0.3) == spb.DOUBLE
    assert spb.datatype_for(ModbusPoint(name="a", address=0, type="bool"), None) == spb.BOOLEAN
    assert spb.datatype_for(OpcUaPoint(name="a", node="i=1"), "text") == spb.STRING
    assert spb.datatype_for(OpcUaPoint(name="a", node="i=1"), None) == spb.DOUBLE
    assert not spb.fits(spb.INT16, 40000) and spb.fits(spb.DOUBLE, 3) and not spb.fits(spb.DOUBLE, True)


# ---------------------------------------------------------------------------------------- a session


async def test_births_then_data_with_contiguous_seq_values_equal_the_twin(tmp_path: Path, broker: Broker, pki: Pki,
                                                                          tahu: Tahu) -> None:
    cfg = sp_config(tmp_path, broker, pki, devices=[
        builders.modbus("dev", builders.numbered("dev.p", 3, unit="bar"), interval="100ms"), setpoint_device()])
    with Recorder(broker, "spBv1.0/#") as recorder:
        agent = Agent(cfg, driver_factory=FakePlant(counting=True, accepts_writes=False).driver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda msgs: sum(1 for m in msgs if "/DDATA/" in m.topic) >= 8)
        finally:
            await agent.stop()
        await recorder.wait_for_async(lambda msgs: any("/NDEATH/" in m.topic for m in msgs))
    messages = node_messages(recorder)
    assert all(m.qos == 0 and not m.retain for m in messages if spb.verb(m.topic) != "NDEATH")
    stream = decoded(tahu, messages)
    assert [k for k, _, _ in stream[:3]] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert_seq_runs(stream)
    nbirth = stream[0][2]
    assert metric(nbirth, "bdSeq") == {"name": "bdSeq", "type": "Int64", "value": 0,
                                       "timestamp": metric(nbirth, "bdSeq")["timestamp"]}
    assert metric(nbirth, "Node Control/Rebirth")["type"] == "Boolean"
    assert metric(nbirth, "Node Control/Rebirth")["value"] is False
    births = {topic: payload for kind, topic, payload in stream if kind == "DBIRTH"}
    assert [m["name"] for m in births[dtopic("DBIRTH", "pump")]["metrics"]] == ["pump.sp"]
    assert {m["name"] for m in births[dtopic("DBIRTH", "dev")]["metrics"]} == {"dev.p0", "dev.p1", "dev.p2"}
    # the fake device reads floats for its uint16 points: the value's kind wins over the config's
    assert all(m["type"] == "Double" and "timestamp" in m for m in births[dtopic("DBIRTH", "dev")]["metrics"])
    # every DDATA value is a sample the twin stored, at the same time (ms); values only ever change
    with reader(cfg) as twin:
        history = {(r["ts"], r["value"]) for r in twin.history("dev.p1", 0)}
    seen = []
    for kind, topic, payload in stream:
        if kind == "DDATA" and topic == dtopic("DDATA", "dev"):
            for m in payload["metrics"]:
                assert m["type"] == "Double" and m["properties"]["Quality"]["value"] == 192
                assert not m.get("isHistorical")
                if m["name"] == "dev.p1":
                    seen.append(m["value"])
                    assert any(abs(ts * 1000 - m["timestamp"]) < 1 and v == m["value"] for ts, v in history), m
    assert len(seen) >= 5 and seen == sorted(set(seen)), seen  # report by exception: no repeats
    raw = tahu.decode(next(m for m in messages if m.topic == dtopic("DDATA", "dev")).payload, host=False)
    assert all("type" not in m for m in raw["metrics"])  # DATA carries no datatype: the birth declared it
    deaths = [p for k, _, p in stream if k == "NDEATH"]
    assert deaths and all(metric(p, "bdSeq")["value"] == 0 for p in deaths)


async def test_rebirth_request_republishes_the_births_with_the_same_bdseq(tmp_path: Path, broker: Broker, pki: Pki,
                                                                          tahu: Tahu) -> None:
    cfg = sp_config(tmp_path, broker, pki)
    with Recorder(broker, "spBv1.0/#") as recorder:
        agent = Agent(cfg, driver_factory=FakePlant(counting=True).driver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda msgs: sum(1 for m in msgs if "/DDATA/" in m.topic) >= 3)
            rebirth = tahu.encode({"timestamp": int(time.time() * 1000), "metrics": [
                {"name": "Node Control/Rebirth", "type": "Boolean", "value": True}]})
            await asyncio.to_thread(recorder.publish, NCMD, rebirth, 0)
            await recorder.wait_for_async(lambda msgs: sum(1 for m in msgs if m.topic == NBIRTH) == 2)
            await recorder.wait_for_async(
                lambda msgs: [m.topic for m in msgs if m.topic != NCMD][-1] == dtopic("DDATA", "dev"))
        finally:
            await agent.stop()
    stream = decoded(tahu, [m for m in node_messages(recorder) if spb.verb(m.topic) != "NDEATH"])
    assert_seq_runs(stream)
    second = [i for i, (k, _, _) in enumerate(stream) if k == "NBIRTH"][1]
    assert stream[second + 1][0] == "DBIRTH" and stream[second + 1][2]["seq"] == 1
    assert metric(stream[second][2], "bdSeq")["value"] == metric(stream[0][2], "bdSeq")["value"] == 0


def _after_last(messages: list[Message], anchor: str, topic: str) -> bool:
    """Whether a message on ``topic`` came after the last one on ``anchor``."""
    topics = [m.topic for m in messages]
    if anchor not in topics:
        return False
    return topic in topics[len(topics) - topics[::-1].index(anchor):]


async def test_device_down_is_a_ddeath_and_back_up_a_dbirth(tmp_path: Path, broker: Broker, pki: Pki,
                                                            tahu: Tahu) -> None:
    cfg = sp_config(tmp_path, broker, pki, devices=[
        builders.modbus("dev", builders.numbered("dev.p", 2), interval="100ms", retry_min="100ms", retry_max="200ms"),
        setpoint_device()])
    plant = FakePlant(counting=True, accepts_writes=False)
    with Recorder(broker, "spBv1.0/#") as recorder:
        agent = Agent(cfg, driver_factory=plant.driver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda msgs: any(m.topic == dtopic("DDATA", "dev") for m in msgs))
            plant.device("dev").reachable = False
            await recorder.wait_for_async(lambda msgs: any(m.topic == dtopic("DDEATH", "dev") for m in msgs))
            await asyncio.sleep(0.5)  # data of the dead device would show up here
            plant.device("dev").reachable = True
            await recorder.wait_for_async(lambda msgs: sum(m.topic == dtopic("DBIRTH", "dev") for m in msgs) == 2)
            # data from the device again after its rebirth (the other device's data interleave)
            await recorder.wait_for_async(
                lambda msgs: _after_last(msgs, dtopic("DBIRTH", "dev"), dtopic("DDATA", "dev")))
        finally:
            await agent.stop()
    stream = decoded(tahu, [m for m in node_messages(recorder) if spb.verb(m.topic) != "NDEATH"])
    assert_seq_runs(stream)
    topics = [t for _, t, _ in stream]
    death = topics.index(dtopic("DDEATH", "dev"))
    rebirth = len(topics) - 1 - topics[::-1].index(dtopic("DBIRTH", "dev"))
    assert dtopic("DDATA", "dev") not in topics[death:rebirth]  # nothing from a dead device
    assert all("value" in m or m.get("isNull") for m in stream[rebirth][2]["metrics"])


async def test_offline_data_is_replayed_as_historical_after_the_births(tmp_path: Path, pki: Pki, tahu: Tahu) -> None:
    with tempfile.TemporaryDirectory() as folder, Broker(pki, Path(folder) / "mosquitto") as broker:
        cfg = sp_config(tmp_path, broker, pki)
        with Recorder(broker, "spBv1.0/#") as recorder:
            agent = Agent(cfg, driver_factory=FakePlant(counting=True).driver)
            await agent.start()
            try:
                await recorder.wait_for_async(lambda msgs: any("/DDATA/" in m.topic for m in msgs))
                broker.stop()
                assert agent.edge_node is not None
                node = agent.edge_node
                await wait_for(lambda: not node.link.connected.is_set(), what="the link noticing")
                outage_start = time.time()
                await asyncio.sleep(1.5)
                outage_end = time.time()
                broker.start()
                recorder.wait_until_subscribed(2)  # blocks the loop: the agent cannot publish before this
                await recorder.wait_for_async(lambda msgs: sum(m.topic == NBIRTH for m in msgs) == 2)
                await recorder.wait_for_async(lambda msgs: _replayed(tahu, msgs), timeout=15)
            finally:
                await agent.stop()
    stream = decoded(tahu, [m for m in node_messages(recorder) if spb.verb(m.topic) != "NDEATH"])
    second = [i for i, (k, _, _) in enumerate(stream) if k == "NBIRTH"][1]
    # every CONNECT takes the next bdSeq, the refused ones during the outage too
    assert metric(stream[second][2], "bdSeq")["value"] > metric(stream[0][2], "bdSeq")["value"]
    assert_seq_runs(stream[second:])
    historical = [m for k, _, p in stream[second:] if k == "DDATA" for m in p["metrics"] if m.get("isHistorical")]
    assert historical, "no historical data after the outage"
    assert any(outage_start * 1000 <= m["timestamp"] <= outage_end * 1000 for m in historical)
    first_data = next(i for i, (k, _, _) in enumerate(stream) if i > second and k == "DDATA")
    assert all(k in ("DBIRTH", "DDEATH") for k, _, _ in stream[second + 1:first_data])


def _replayed(tahu: Tahu, messages: list[Message]) -> bool:
    """Whether historical DDATA arrived after the second NBIRTH (the replay after the outage)."""
    births = [i for i, m in enumerate(messages) if m.topic == NBIRTH]
    return len(births) >= 2 and any(
        m.topic == dtopic("DDATA", "dev") and any(x.get("isHistorical") for x in tahu.decode(m.payload)["metrics"])
        for m in messages[births[1]:])


# ---------------------------------------------------------------------------------------- writes


async def test_dcmd_writes_are_refused_by_default(tmp_path: Path, broker: Broker, pki: Pki, tahu: Tahu,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cfg = sp_config(tmp_path, broker, pki, devices=[setpoint_device()])
    plant = FakePlant(default=5.0)
    with Recorder(broker, "spBv1.0/#") as recorder:
        agent = Agent(cfg, driver_factory=plant.driver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda msgs: any(m.topic == dtopic("DBIRTH", "pump") for m in msgs))
            command = tahu.encode({"metrics": [{"name": "pump.sp", "type": "Float", "value": 7.5}]})
            await asyncio.to_thread(recorder.publish, dtopic("DCMD", "pump"), command, 0)
            await wait_for(lambda: any("refused: sparkplug.accept_writes is false" in r.getMessage()
                                       for r in caplog.records), what="the refusal logged")
        finally:
            await agent.stop()
    assert plant.device("pump").written == []


async def test_dcmd_writes_go_through_the_safety_gate_when_accepted(tmp_path: Path, broker: Broker, pki: Pki,
                                                                    tahu: Tahu) -> None:
    cfg = sp_config(tmp_path, broker, pki, devices=[setpoint_device()], sparkplug={"accept_writes": True})
    plant = FakePlant(default=5.0)
    with Recorder(broker, "spBv1.0/#") as recorder:
        agent = Agent(cfg, driver_factory=plant.driver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda msgs: any(m.topic == dtopic("DBIRTH", "pump") for m in msgs))
            good = tahu.encode({"metrics": [{"name": "pump.sp", "type": "Float", "value": 7.5}]})
            out_of_range = tahu.encode({"metrics": [{"name": "pump.sp", "type": "Double", "value": 250.0}]})
            await asyncio.to_thread(recorder.publish, dtopic("DCMD", "pump"), good, 0)
            await wait_for(lambda: plant.device("pump").written, what="the write")
            await asyncio.to_thread(recorder.publish, dtopic("DCMD", "pump"), out_of_range, 0)

            async def writes() -> list[dict[str, Any]]:
                return await agent.query(lambda view: view.writes(0.0))

            rows = await wait_for(lambda: _at_least(writes(), 2), what="two write records")
            data = await recorder.wait_for_async(lambda msgs: [tahu.decode(m.payload) for m in msgs
                                                               if m.topic == dtopic("DDATA", "pump")])
        finally:
            await agent.stop()
    assert plant.device("pump").written == [("pump.sp", 7.5)]
    assert [(r["source"], r["point"], r["requested"], r["result"]) for r in rows] == [
        ("sparkplug", "pump.sp", 7.5, "applied"), ("sparkplug", "pump.sp", 250.0, "rejected")]
    assert any(m["value"] == 7.5 for d in data for m in d["metrics"])  # the new value reported back as DDATA


async def _at_least(rows: Any, n: int) -> list[dict[str, Any]] | None:
    got: list[dict[str, Any]] = await rows
    return got if len(got) >= n else None


# ---------------------------------------------------------------------------------------- primary host


async def test_births_wait_for_the_primary_host_and_end_when_it_goes_offline(tmp_path: Path, broker: Broker,
                                                                             pki: Pki, tahu: Tahu) -> None:
    cfg = sp_config(tmp_path, broker, pki, sparkplug={"primary_host": "scada"})
    state = "spBv1.0/STATE/scada"
    with Recorder(broker, "spBv1.0/#") as recorder:
        agent = Agent(cfg, driver_factory=FakePlant(counting=True).driver)
        await agent.start()
        try:
            assert agent.edge_node is not None
            node = agent.edge_node
            await wait_for(lambda: node.link.connected.is_set(), what="the node connected")
            await asyncio.sleep(1.0)
            assert not any(m.topic == NBIRTH for m in recorder.messages()), "born before the host was online"
            t0 = int(time.time() * 1000)
            await asyncio.to_thread(recorder.publish, state, json.dumps({"online": True, "timestamp": t0}), 1, True)
            await recorder.wait_for_async(lambda msgs: any(m.topic == NBIRTH for m in msgs))
            await asyncio.to_thread(recorder.publish, state, json.dumps({"online": False, "timestamp": t0 - 5}), 1)
            await asyncio.sleep(0.5)
            assert not any(m.topic == NDEATH for m in recorder.messages()), "an older offline STATE was obeyed"
            await asyncio.to_thread(recorder.publish, state, json.dumps({"online": False, "timestamp": t0 + 1}), 1,
                                    True)
            await recorder.wait_for_async(lambda msgs: any(m.topic == NDEATH for m in msgs))
            await wait_for(lambda: node.link.connects >= 2, what="a new connection")
            await asyncio.sleep(0.5)
            assert sum(m.topic == NBIRTH for m in recorder.messages()) == 1, "born again while the host is offline"
            await asyncio.to_thread(recorder.publish, state, json.dumps({"online": True, "timestamp": t0 + 2}), 1,
                                    True)
            await recorder.wait_for_async(lambda msgs: sum(m.topic == NBIRTH for m in msgs) == 2)
        finally:
            await agent.stop()
    births = [tahu.decode(m.payload) for m in recorder.messages(NBIRTH)]
    deaths = [tahu.decode(m.payload) for m in recorder.messages(NDEATH)]
    assert metric(deaths[0], "bdSeq")["value"] == metric(births[0], "bdSeq")["value"] == 0
    assert metric(births[1], "bdSeq")["value"] >= 1


# ---------------------------------------------------------------------------------------- kill -9


def test_kill9_leaves_the_will_ndeath_and_the_next_session_takes_the_next_bdseq(tmp_path: Path, pki: Pki,
                                                                                broker: Broker, tahu: Tahu) -> None:
    modbus = free_port()
    plant = subprocess.Popen([sys.executable, "-m", "edge_agent.demo.plant", "--opcua-port", str(free_port()),
                              "--modbus-port", str(modbus)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = sp_config(tmp_path, broker, pki, devices=[builders.modbus(
        "pump1", [builders.point("pump1.flow", address=0, type="float32", unit="m3/h"),
                  builders.point("pump1.speed", address=4, type="uint16", unit="rpm")], port=modbus,
        interval="200ms", retry_min="200ms", retry_max="1s")])
    err = (tmp_path / "agent.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(cfg.source)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    try:
        with Recorder(broker, "spBv1.0/#") as recorder:
            first = start()
            recorder.wait_for(lambda msgs: any(m.topic == dtopic("DDATA", "pump1") for m in msgs), timeout=30)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            recorder.wait_for(lambda msgs: any(m.topic == NDEATH for m in msgs), timeout=10)
            second = start()
            recorder.wait_for(lambda msgs: sum(m.topic == NBIRTH for m in msgs) == 2, timeout=30)
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
            wait_for_sync(lambda: sum(m.topic == NDEATH for m in recorder.messages()) >= 2, what="the second NDEATH")
    finally:
        err.close()
        plant.terminate()
        plant.wait(10)
    births = [tahu.decode(m.payload) for m in recorder.messages(NBIRTH)]
    deaths = recorder.messages(NDEATH)
    assert all(m.qos == 1 and not m.retain for m in deaths)
    decoded_deaths = [tahu.decode(m.payload) for m in deaths]
    assert all("seq" not in d for d in decoded_deaths)
    assert [metric(b, "bdSeq")["value"] for b in births] == [0, 1]
    dbirth = tahu.decode(recorder.messages(dtopic("DBIRTH", "pump1"))[0].payload)
    assert (metric(dbirth, "pump1.speed")["type"], metric(dbirth, "pump1.flow")["type"]) == ("UInt16", "Double")
    assert metric(decoded_deaths[0], "bdSeq")["value"] == 0  # the Will of the killed session
    assert {metric(d, "bdSeq")["value"] for d in decoded_deaths[1:]} == {1}  # the clean stop's, and its Will
    assert json.loads((tmp_path / "data" / "sparkplug.json").read_text()) == {"bd_seq": 1}

