"""Operator overrides: a second client writes a writable point the way an HMI would, and the gate notices.

The HMI is a separate pymodbus client on a Registers server (tests/gate_support.py) or a separate
asyncua session on the simulated plant's chiller; the agent is the real one with recording drivers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.demo.plant import Plant
from edge_agent.service import status as status_file
from edge_agent.store.views import TwinView
from tests import builders
from tests.builders import plant_config
from tests.fakes import WriteLog
from tests.gate_support import Registers, gate_watching, hmi_write_registers, hmi_write_setpoint
from tests.helpers import SPEED, free_port, opcua_setpoint, reader, running, wait_for
from tests.mqtt_broker import AGENT_CN, Broker, Pki, Recorder
from tests.schemas import load_schema, validate

SP = "pump.speed_setpoint"


def pump_config(tmp_path: Path, port: int) -> AgentConfig:
    point = builders.point(SP, address=20, type="uint16", writable=True, min=900.0, max=1700.0, max_step=400.0,
                           deadband=50.0)
    doc = builders.config(tmp_path, id="override-test", gate={"readback_timeout": "1.5s"},
                          devices=[builders.modbus("pump", [point], port=port, interval="0.2s")])
    return builders.load(doc, tmp_path / "agent.toml")


def overrides(twin: TwinView, state: str = "raised") -> list[dict[str, Any]]:
    return [e for e in twin.events() if e["kind"] == "override" and e["state"] == state]


async def test_an_hmi_write_to_a_register_holds_automatic_writes_until_acked(tmp_path: Path) -> None:
    writes = WriteLog()
    async with Registers(free_port()) as device:
        await device.set_holding(20, [1450])
        cfg = pump_config(tmp_path, device.port)
        async with running(cfg, writes, ready=(SP,)) as agent:
            twin, gate = reader(cfg), agent.gate
            result = await gate.request(SP, 1500, source="optimizer")  # the gate's own write is no override
            assert result.result == "applied", result
            await hmi_write_registers(device.port, 20, [1530])  # inside the deadband: no override either
            await wait_for(lambda: agent.latest[SP].value == 1530, timeout=5, what="the agent seeing 1530")
            await hmi_write_registers(device.port, 20, [1200])
            [event] = await wait_for(lambda: overrides(twin), timeout=5, what="the override event")
            assert (event["source"], event["equipment"]) == ("gate", "pump")
            assert {k: event["detail"][k] for k in ("point", "old", "new")} == {"point": SP, "old": 1500, "new": 1200}
            assert "changed at the device from 1500 to 1200 and the gate did not write it" in event["message"]

            # status (status.json, `edge-agent status`) shows the hold
            [held] = agent.status().overrides
            assert (held.point, held.event, held.old, held.new) == (SP, event["id"], 1500.0, 1200.0)
            assert 1790 < held.until - held.since <= 1800  # gate.override_hold: 30 min by default
            await agent.write_status()
            shown = json.loads((cfg.agent.data_dir / status_file.STATUS_FILE).read_text())["overrides"]
            assert [(o["point"], o["event"], o["new"]) for o in shown] == [(SP, event["id"], 1200.0)]
            assert "override: pump.speed_setpoint" in agent.status().summary()
            await hmi_write_registers(device.port, 20, [1320])  # the operator again: the hold goes on, no new event
            await wait_for(lambda: agent.status().overrides[0].new == 1320, timeout=5, what="the hold on 1320")

            for source in ("optimizer", "cloud"):
                result = await gate.request(SP, 1300, source=source)
                assert result.result == "rejected", result
                assert result.reason.startswith(f"{SP} is held after an operator override at the device "
                                                "(1500 -> 1320): automatic writes resume in "), result
                assert result.reason.endswith(f"or when event {event['id']} is acknowledged")
            result = await gate.request(SP, 1250, source="operator", actor="ann")  # operators still write
            assert result.result == "applied", result
            twin.close()

        # a restart keeps the hold (the event is in the twin)
        async with running(cfg, writes, ready=(SP,)) as agent:
            twin, gate = reader(cfg), agent.gate
            assert [o.point for o in agent.status().overrides] == [SP]
            assert (await gate.request(SP, 1300, source="optimizer")).result == "rejected"
            assert agent.event_acked(event["id"], "ann") == [SP]
            [cleared] = await wait_for(lambda: overrides(twin, "cleared"), timeout=5, what="the hold lifted")
            assert cleared["message"] == f"automatic writes to {SP} resume: event {event['id']} acknowledged by ann"
            assert agent.status().overrides == ()
            result = await gate.request(SP, 1300, source="optimizer")
            assert result.result == "applied", result
            assert len(overrides(twin)) == 1  # none of the gate's writes counted as an override
            twin.close()
    assert [(p, v, ) for p, v, _ in writes.calls] == [(SP, 1500), (SP, 1250), (SP, 1300)]
    writes.assert_all_through_gate()


async def test_an_opcua_hmi_write_is_published_and_its_hold_expires(tmp_path: Path, broker: Broker,
                                                                    pki: Pki) -> None:
    writes = WriteLog()
    events_topic = f"edge/plant-a/{AGENT_CN}/events"
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=31, speed=SPEED,
                     steady_load=True) as plant:
        doc = builders.config(
            tmp_path, id=AGENT_CN, site="plant-a", gate={"override_hold": "3s", "readback_timeout": "2s"},
            twin={"flush_interval": "50ms"}, mqtt=builders.mqtt(pki, broker.port, publish_interval="100ms"),
            devices=[builders.chiller(plant), builders.pump(plant)])
        cfg = builders.load(doc, tmp_path / "agent.toml")
        with Recorder(broker, events_topic) as recorder:
            async with running(cfg, writes, ready=("chiller1.setpoint",)) as agent:
                twin = reader(cfg)
                await gate_watching(agent, "chiller1.setpoint")
                await hmi_write_setpoint(plant.opcua_endpoint, 8.0)
                published = await recorder.wait_for_async(
                    lambda ms: [m.json() for m in ms if m.json().get("type") == "override"], timeout=10)
                body = published[0]
                validate(body, load_schema("events"))
                assert (body["point"], body["old"], body["new"], body["state"]) == ("chiller1.setpoint", 7.0, 8.0,
                                                                                   "raised")
                result = await agent.gate.request("chiller1.setpoint", 8.5, source="optimizer")
                assert result.result == "rejected" and "held after an operator override" in result.reason, result
                # no ack: the hold runs out after gate.override_hold
                await wait_for(lambda: overrides(twin, "cleared"), timeout=10, what="the hold expired")
                assert overrides(twin, "cleared")[0]["message"] == (
                    "automatic writes to chiller1.setpoint resume: the hold of 3 s expired")
                result = await agent.gate.request("chiller1.setpoint", 8.5, source="optimizer")
                assert result.result == "applied", result
                assert await opcua_setpoint(plant.opcua_endpoint) == 8.5
                await recorder.wait_for_async(
                    lambda ms: [m for m in ms if m.json().get("type") == "override" and m.json()["state"] == "cleared"],
                    timeout=10)
                assert len(overrides(twin)) == 1
                twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("chiller1.setpoint", 8.5)]


async def test_a_device_side_change_while_the_agent_polls_the_plant_is_one_override(tmp_path: Path) -> None:
    """The pump's Modbus setpoint on the simulated plant, written by an HMI client: one event, not one per poll."""
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=32, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant)
        async with running(cfg, writes, ready=("pump1.speed_setpoint",)) as agent:
            twin = reader(cfg)
            await gate_watching(agent, "pump1.speed_setpoint")
            await hmi_write_registers(plant.modbus_port, 20, [1600])
            await wait_for(lambda: plant.model.pump_speed_setpoint == 1600, timeout=5, what="the pump on 1600")
            [event] = await wait_for(lambda: overrides(twin), timeout=5, what="the override event")
            assert (event["detail"]["old"], event["detail"]["new"]) == (1450, 1600)
            polls = agent.runners["pump1"].status.reads
            await wait_for(lambda: agent.runners["pump1"].status.reads >= polls + 5, timeout=10, what="five more polls")
            assert len(overrides(twin)) == 1 and [o.point for o in agent.status().overrides] == ["pump1.speed_setpoint"]
            twin.close()
    assert writes.calls == []


async def test_a_gate_with_nothing_to_watch_starts_watching_after_a_reload(tmp_path: Path) -> None:
    """Without writable points the gate does not tick at all; a reload that adds one wakes it."""
    writes = WriteLog()
    async with Registers(free_port()) as device:
        await device.set_holding(20, [1450])
        writable = pump_config(tmp_path, device.port)
        point = builders.point(SP, address=20, type="uint16", deadband=50.0)  # read-only at first
        doc = builders.config(tmp_path, id="override-test", gate={"readback_timeout": "1.5s"},
                              devices=[builders.modbus("pump", [point], port=device.port, interval="0.2s")])
        read_only = builders.load(doc, tmp_path / "agent.toml")
        async with running(read_only, writes, ready=(SP,)) as agent:
            twin = reader(read_only)
            await wait_for(lambda: agent.runners["pump"].status.reads >= 3, timeout=5, what="three polls")
            assert agent.gate.overrides.known == {}  # no ticks: nothing looked at the point
            await agent.reload(writable)
            await gate_watching(agent, SP)
            await hmi_write_registers(device.port, 20, [1200])
            [event] = await wait_for(lambda: overrides(twin), timeout=5, what="the override event")
            assert (event["detail"]["old"], event["detail"]["new"]) == (1450, 1200)
            twin.close()
    assert writes.calls == []
