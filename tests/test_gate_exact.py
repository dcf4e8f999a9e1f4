"""The safety gate checks what is written, undoes what is not confirmed, remembers across restarts and
takes only the right kinds of values: against real pymodbus and asyncua servers that are not our
simulator (tests/gate_support.py), with recording drivers (tests/fakes.WriteLog).
"""

from __future__ import annotations

from pathlib import Path

from asyncua import ua

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.demo.plant import float32_registers
from tests import builders
from tests.fakes import FakePlant, WriteLog
from tests.gate_support import (
    TYPED_URI,
    Registers,
    assert_recorded,
    assert_undone,
    f32,
    typed_nodes,
)
from tests.helpers import free_port, reader, running, wait_for


def meter_config(tmp_path: Path, port: int, gate: builders.Doc | None = None,
                 level_interval: str = "0s") -> AgentConfig:
    """A Modbus meter on a Registers server: scaled int16 points, a float32, a coil."""
    points = [
        builders.point("meter.target", address=10, type="float32", word_order="little", writable=True,
                       min=-1000.0, max=1000.0, max_step=1000.0),
        # raw = value / 10: only multiples of 10 can be written
        builders.point("meter.level", address=14, type="int16", scale=10.0, writable=True, min=211.0, max=400.0,
                       max_step=1000.0, min_interval=level_interval),
        builders.point("meter.stage", address=16, type="int16", scale=10.0, writable=True, min=0.0, max=1000.0,
                       max_step=15.0),
        builders.point("meter.valve", address=17, type="int16", writable=True, min=5.0, max=10.0, max_step=1.0),
        builders.point("meter.mode", address=18, type="int16", writable=True, min=0.0, max=100.0,
                       min_interval="1h"),
        builders.point("meter.pump", register="coil", address=0, type="bool", writable=True, min=0.0, max=1.0),
    ]
    doc = builders.config(tmp_path, id="gate-exact", gate={"readback_timeout": "1.5s", **(gate or {})},
                          devices=[builders.modbus("meter", points, port=port, interval="0.2s")])
    return builders.load(doc, tmp_path / "agent.toml")


READY = ("meter.level", "meter.stage", "meter.valve", "meter.pump")


async def test_modbus_range_and_step_are_checked_on_the_register_value(tmp_path: Path) -> None:
    """int16, scale 10, min 211: 214 used to pass and write raw 21 (= 210); ramp checked the request."""
    writes = WriteLog()
    async with Registers(free_port()) as device:
        await device.set_holding(14, [25])  # meter.level = 250
        await device.set_holding(16, [10])  # meter.stage = 100
        cfg = meter_config(tmp_path, device.port, gate={"ramp": True})
        async with running(cfg, writes, ready=READY) as agent:
            twin, gate = reader(cfg), agent.gate
            result = await gate.request("meter.level", 214, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  "214 (the device would hold 210) is outside the safe range 211..400")
            assert await device.holding(14, 1) == [25]
            result = await gate.request("meter.level", 216, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert (result.requested, result.written, result.readback) == (216.0, 220.0, 220.0)
            assert await device.holding(14, 1) == [22]

            # max_step 15 from 100: 115 rounds to raw 12, a step of 20
            result = await gate.request("meter.stage", 115, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  "step +20 is larger than max_step 15 (115 would be written as 120)")
            assert await device.holding(16, 1) == [10]
            result = await gate.request("meter.stage", 114, source="operator")
            assert (result.result, result.written, result.readback) == ("applied", 110.0, 110.0), result

            # ramp = true: the step written must be in range, not just the request (device at 0, range 5..10)
            result = await gate.request("meter.valve", 6, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  "ramping towards 6: the next step 1 is outside the safe range 5..10")
            assert await device.holding(17, 1) == [0]
            await device.set_holding(17, [5])
            await wait_for(lambda: agent.latest["meter.valve"].value == 5, timeout=5, what="the valve at 5")
            result = await gate.request("meter.valve", 8, source="operator")
            await assert_recorded(twin, result, "applied", "ramping: one max_step towards 8")
            assert (result.requested, result.written) == (8.0, 6.0) and await device.holding(17, 1) == [6]
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("meter.level", 220.0), ("meter.stage", 110.0),
                                                    ("meter.valve", 6)]
    writes.assert_all_through_gate()


async def test_kinds_are_strict(tmp_path: Path) -> None:
    """true used to be written as 1.0 to a number; 1 as true to a coil; strings are refused too."""
    writes = WriteLog()
    async with Registers(free_port()) as device:
        await device.set_holding(14, [25])
        cfg = meter_config(tmp_path, device.port)
        async with running(cfg, writes, ready=READY) as agent:
            twin, gate = reader(cfg), agent.gate
            result = await gate.request("meter.level", True, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  '"meter.level" is a number (int16): expected a number, got true')
            result = await gate.request("meter.level", "300", source="operator")
            await assert_recorded(twin, result, "rejected", "expected a number, got '300'")
            assert result.requested is None
            result = await gate.request("meter.pump", 1, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  '"meter.pump" is a bool point: expected true or false, got 1')
            result = await gate.request("meter.pump", "on", source="operator")
            await assert_recorded(twin, result, "rejected", "expected true or false, got 'on'")
            result = await gate.request("meter.pump", True, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert (result.requested, result.written, result.readback) == (1.0, 1.0, 1.0)
            await wait_for(lambda: agent.latest["meter.pump"].value is True, timeout=5, what="the coil on")
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("meter.pump", True)]


async def test_opcua_node_types_decide_the_value_written(tmp_path: Path) -> None:
    """An Int16 node gets the request rounded, a Float node float32; both are checked on that value."""
    writes = WriteLog()
    async with typed_nodes() as (endpoint, server, ids):
        def node(name: str) -> str:
            return f"nsu={TYPED_URI};s=Line1.{name}"

        points = [
            builders.point("line.count", node=node("Count"), writable=True, min=0.4, max=10.0),
            builders.point("line.ratio", node=node("Ratio"), writable=True, min=0.0, max=0.1),
            builders.point("line.running", node=node("Running"), writable=True, min=0.0, max=1.0),
        ]
        doc = builders.config(tmp_path, gate={"readback_timeout": "1.5s"}, devices=[
            builders.opcua("line", endpoint, points, mode="subscribe", interval="0.2s")])
        cfg = builders.load(doc, tmp_path / "agent.toml")
        async with running(cfg, writes, ready=("line.count", "line.ratio", "line.running")) as agent:
            twin, gate = reader(cfg), agent.gate
            result = await gate.request("line.count", 0.4, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  "0.4 (the device would hold 0) is outside the safe range 0.4..10")
            result = await gate.request("line.count", 6.6, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert (result.requested, result.written, result.readback) == (6.6, 7.0, 7.0)
            stored = server.read_attribute_value(ids["Count"]).Value
            assert (stored.Value, stored.VariantType) == (7, ua.VariantType.Int16)
            result = await gate.request("line.count", True, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  "cannot be written: expected a number for a node of type Int16, got True")

            result = await gate.request("line.ratio", 0.1, source="operator")  # float32(0.1) > 0.1
            await assert_recorded(twin, result, "rejected",
                                  "0.1 (the device would hold 0.100000001) is outside the safe range 0..0.1")
            result = await gate.request("line.ratio", 0.05, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert result.written == f32(0.05) and result.readback == f32(0.05) and f32(0.05) != 0.05

            result = await gate.request("line.running", 1, source="operator")
            await assert_recorded(twin, result, "rejected",
                                  "cannot be written: expected true or false for a Boolean node, got 1")
            result = await gate.request("line.running", True, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert server.read_attribute_value(ids["Running"]).Value.Value is True
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("line.count", 7), ("line.ratio", f32(0.05)),
                                                    ("line.running", True)]
    writes.assert_all_through_gate()


async def test_a_value_the_device_cannot_hold_is_refused(tmp_path: Path) -> None:
    """More than half a raw step between the request and what the device would hold: refused, naming both."""
    plant = FakePlant(default=50.0)
    plant.device("dev").holds = lambda value: min(float(value), 100.0)  # a device that saturates at 100
    sp = builders.point("dev.sp", address=0, writable=True, min=0.0, max=200.0, max_step=200.0)
    doc = builders.config(tmp_path, gate={"readback_timeout": "1s"},
                          devices=[builders.modbus("dev", [sp], interval="0.1s")])
    agent = Agent(builders.load(doc, tmp_path / "agent.toml"), driver_factory=plant.driver)
    await agent.start()
    try:
        await wait_for(lambda: "dev.sp" in agent.latest, what="the first reading")
        result = await agent.gate.request("dev.sp", 150, source="operator")
        assert (result.result, result.written) == ("rejected", None), result
        assert result.reason == ("150 cannot be written exactly: the device would hold 100, more than half a raw "
                                 "step away")
        result = await agent.gate.request("dev.sp", 90, source="operator")
        assert (result.result, result.written, result.readback) == ("applied", 90.0, 90.0), result
    finally:
        await agent.stop()
    assert plant.device("dev").written == [("dev.sp", 90.0)]


async def test_an_unconfirmed_write_is_undone(tmp_path: Path) -> None:
    """A device that applies a write after readback_timeout used to keep it (failed, nothing undone)."""
    writes = WriteLog()
    async with Registers(free_port()) as device:
        await device.set_holding(10, float32_registers(5.0, "little"))
        cfg = meter_config(tmp_path, device.port, gate={"readback_timeout": "2.5s"})
        async with running(cfg, writes, ready=("meter.target",)) as agent:
            twin = reader(cfg)
            device.late = {10: 3.3, 11: 3.3}  # acknowledged at once, applied 3.3 s later (in order)
            result = await agent.gate.request("meter.target", 50.0, source="operator", actor="ann")
            assert result.reason.startswith("read-back: the device reports 5, expected 50 within 2.5 s"), result
            await assert_undone(twin, result, 5.0)
            assert await device.holding(10, 2) == float32_registers(5.0, "little")
            events = await wait_for(lambda: [e for e in twin.events() if e["kind"] == "rollback"], timeout=5,
                                    what="the rollback event")
            assert [e["message"] for e in events] == [
                "meter.target: the write of 50 (operator) was not confirmed; restored to 5"]
            assert [e for e in twin.events() if e["kind"] == "override"] == []  # the gate's own writes
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("meter.target", 50.0), ("meter.target", 5.0)]
    writes.assert_all_through_gate()


async def test_min_interval_and_last_writes_survive_a_restart(tmp_path: Path) -> None:
    """min_interval used to live in memory only: a restart allowed an immediate second write."""
    writes = WriteLog()
    async with Registers(free_port()) as device:
        await device.set_holding(14, [25])
        cfg = meter_config(tmp_path, device.port, level_interval="1h")
        async with running(cfg, writes, ready=("meter.mode", "meter.level")) as agent:
            assert (await agent.gate.request("meter.mode", 42, source="operator")).result == "applied"
            refused = await agent.gate.request("meter.level", 500, source="operator")  # never reached the device
            assert refused.result == "rejected"
        async with running(cfg, writes, ready=("meter.mode", "meter.level")) as agent:
            assert agent.latest["meter.mode"].value == 42
            for source in ("operator", "optimizer"):
                result = await agent.gate.request("meter.mode", 43, source=source)
                assert result.result == "rejected", result
                assert result.reason.startswith("too soon: the last write was ") and "min_interval is 3600 s" in \
                    result.reason
            result = await agent.gate.request("meter.level", 300, source="operator")
            assert result.result == "applied", result
        assert await device.holding(18, 1) == [42]
    assert [(p, v) for p, v, _ in writes.calls] == [("meter.mode", 42), ("meter.level", 300.0)]
