"""The safety gate against real servers: refusals, read-back, word order, and "no other path writes".

Every test runs the real Agent in-process against real asyncua and pymodbus servers (the
simulated plant, or a small pymodbus server of our own), with a driver factory that wraps the
real driver classes and records the call stack of every ``write`` (our own interface, not a
library mock), so each test also proves that writes came through edge_agent/control/gate.py.
"""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.base import GOOD
from edge_agent import config as config_mod
from edge_agent.config import AgentConfig
from edge_agent.demo.plant import Plant, float32_registers
from edge_agent.store.twin import Twin
from tests import builders
from tests.builders import plant_config
from tests.fakes import WriteLog
from tests.gate_support import Registers, assert_recorded, assert_undone, f32, modbus_holding
from tests.helpers import SPEED, free_port, opcua_setpoint, reader, running, wait_for
from tests.onnx_models import zscore_model

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- shared plumbing
# WriteLog (tests/fakes.py) records every driver write; plant_config (tests/builders.py) is the config for
# the simulated plant's chiller and pump; running, reader and opcua_setpoint are in tests/helpers.py.


# ---------------------------------------------------------------------------- refusals


async def test_refusals_record_their_reason(tmp_path: Path) -> None:
    """Range, step, interval, anomaly, unknown, read-only, non-numeric and bad-data requests are refused."""
    zscore_model(tmp_path / "hot.onnx", mean=[0.0], scale=[1.0], inputs=["chiller1.load"])
    model = builders.model("hot-load", "anomaly", "hot.onnx", interval="0.2s", threshold=1.0, raise_after=1)
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=5, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant, models=[model])
        async with running(cfg, writes, ready=("chiller1.setpoint", "pump1.speed_setpoint")) as agent:
            twin = reader(cfg)
            gate = agent.gate
            assert agent.latest["pump1.speed_setpoint"].value == 1450

            result = await gate.request("pump1.speed_setpoint", 1800, source="operator", actor="ann")
            await assert_recorded(twin, result, "rejected", "1800 is outside the safe range 900..1700")
            assert (result.actor, result.written, result.old) == ("ann", None, 1450.0)

            result = await gate.request("pump1.speed_setpoint", 1200, source="cloud")
            await assert_recorded(twin, result, "rejected", "step -250 is larger than max_step 100")

            applied = await gate.request("pump1.speed_setpoint", 1500, source="operator")
            await assert_recorded(twin, applied, "applied", "")
            assert (applied.written, applied.readback) == (1500.0, 1500.0)
            await wait_for(lambda: plant.model.pump_speed_setpoint == 1500, timeout=5, what="the plant on 1500")
            result = await gate.request("pump1.speed_setpoint", 1550, source="operator")
            await assert_recorded(twin, result, "rejected", "too soon: the last write was ")

            await wait_for(lambda: agent.anomaly_active("chiller1"), timeout=10, what="the anomaly raised")
            result = await gate.request("chiller1.setpoint", 7.2, source="operator")
            await assert_recorded(twin, result, "rejected", "an anomaly is active on chiller1 (hot-load)")

            result = await gate.request("nope", 1.0, source="operator")
            await assert_recorded(twin, result, "rejected", 'no point named "nope"')
            result = await gate.request("pump1.flow", 10.0, source="operator")
            await assert_recorded(twin, result, "rejected", '"pump1.flow" is not writable')
            result = await gate.request("pump1.speed_setpoint", float("nan"), source="operator")
            assert result.result == "rejected" and "not a finite number" in result.reason

            await plant.set_modbus_online(False)
            await wait_for(lambda: agent.latest["pump1.speed_setpoint"].quality != GOOD, timeout=10,
                           what="the pump's points bad")
            result = await gate.request("pump1.speed_setpoint", 1450, source="operator")
            quality = agent.latest["pump1.speed_setpoint"].quality
            await assert_recorded(twin, result, "rejected", f"the point's data is {quality}")
            result = await gate.request("chiller1.setpoint", 7.2, source="optimizer", inputs=("pump1.flow",))
            await assert_recorded(twin, result, "rejected", "model input pump1.flow is ")
            twin.close()
        assert plant.model.chiller_setpoint == 7.0 and plant.model.pump_speed_setpoint == 1500
    assert [(p, v) for p, v, _ in writes.calls] == [("pump1.speed_setpoint", 1500.0)]
    writes.assert_all_through_gate()


async def test_unchanged_subscribed_setpoint_is_not_stale(tmp_path: Path) -> None:
    """A subscribed setpoint that has not changed for longer than max_input_age is still current.

    OPC UA sends a data change only when the value changes; the link is alive (keep-alives), so
    the gate must not call the reported value stale just because its source time is old.
    """
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=6, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant, gate={"max_input_age": "1s", "readback_timeout": "3s"})
        async with running(cfg, writes, ready=("chiller1.setpoint",)) as agent:
            await wait_for(lambda: time.time() - agent.latest["chiller1.setpoint"].ts > 1.5, timeout=10,
                           what="the setpoint's last change older than max_input_age")
            assert agent.runners["chiller1"].status.state == "up"
            result = await agent.gate.request("chiller1.setpoint", 7.5, source="operator")
            assert result.result == "applied", result


# ---------------------------------------------------------------------------- applied writes


async def test_opcua_write_lands_and_ramp_moves_one_max_step(tmp_path: Path) -> None:
    """OPC UA write verified by read-back; with ramp = true a large request moves exactly one max_step."""
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=7, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant, gate={"ramp": True, "readback_timeout": "3s"})
        async with running(cfg, writes, ready=("chiller1.setpoint", "pump1.speed_setpoint")) as agent:
            twin = reader(cfg)
            result = await agent.gate.request("chiller1.setpoint", 7.5, source="operator", actor="ann")
            await assert_recorded(twin, result, "applied", "")
            assert (result.old, result.requested, result.written, result.readback) == (7.0, 7.5, 7.5, 7.5)
            assert await opcua_setpoint(plant.opcua_endpoint) == 7.5
            await wait_for(lambda: plant.model.chiller_setpoint == 7.5, timeout=5, what="the plant on 7.5")

            result = await agent.gate.request("pump1.speed_setpoint", 1700, source="operator")
            await assert_recorded(twin, result, "applied", "ramping: one max_step towards 1700")
            assert (result.old, result.requested, result.written, result.readback) == (1450, 1700, 1550, 1550)
            await wait_for(lambda: plant.model.pump_speed_setpoint == 1550, timeout=5, what="the plant on 1550")
            assert await modbus_holding(plant.modbus_port, 20, 1) == [1550]  # the raw register
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("chiller1.setpoint", 7.5), ("pump1.speed_setpoint", 1550.0)]
    writes.assert_all_through_gate()


def registers_config(tmp_path: Path, port: int, gate: builders.Doc | None = None) -> AgentConfig:
    limits = {"writable": True, "min": -1000.0, "max": 1000.0, "max_step": 1000.0}
    points = [
        builders.point("meter.target", address=10, type="float32", word_order="little", **limits),  # low word first
        builders.point("meter.limit", address=12, type="float32", word_order="big", **limits),  # high word first, next
        # scaled int16: raw = value * 10
        builders.point("meter.mode", address=14, type="int16", scale=0.1, writable=True, min=0.0, max=100.0),
    ]
    doc = builders.config(tmp_path, id="gate-test", gate={"readback_timeout": "1.5s", **(gate or {})},
                          devices=[builders.modbus("meter", points, port=port, interval="0.2s")])
    return builders.load(doc, tmp_path / "agent.toml")


async def test_modbus_float32_little_word_order_lands_as_read_back(tmp_path: Path) -> None:
    """On a server that is not our simulator: the registers hold low word first and read back as written."""
    writes = WriteLog()
    async with Registers(free_port()) as device:
        cfg = registers_config(tmp_path, device.port)
        async with running(cfg, writes, ready=("meter.target", "meter.limit")) as agent:
            twin = reader(cfg)
            result = await agent.gate.request("meter.target", 123.456, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert result.readback == f32(123.456) and result.old == 0.0
            raw = await device.holding(10, 2)
            assert raw == float32_registers(123.456, "little")
            high, low = struct.unpack(">HH", struct.pack(">f", 123.456))
            assert raw == [low, high] and raw != [high, low]
            # the driver's own poll decodes the same value
            await wait_for(lambda: agent.latest["meter.target"].value == f32(123.456), timeout=5,
                           what="the polled value")

            result = await agent.gate.request("meter.limit", -98.25, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert await device.holding(12, 2) == float32_registers(-98.25, "big")
            assert await device.holding(10, 2) == float32_registers(123.456, "little")  # neighbour untouched

            result = await agent.gate.request("meter.mode", 42.3, source="operator")
            await assert_recorded(twin, result, "applied", "")
            assert await device.holding(14, 1) == [423] and result.readback is not None
            assert abs(result.readback - 42.3) < 1e-6
            twin.close()
    assert [p for p, _, _ in writes.calls] == ["meter.target", "meter.limit", "meter.mode"]
    writes.assert_all_through_gate()


# ---------------------------------------------------------------------------- devices that ignore writes


async def test_modbus_device_that_ignores_the_write_is_marked_failed(tmp_path: Path) -> None:
    writes = WriteLog()
    async with Registers(free_port()) as device:
        await device.set_holding(10, float32_registers(5.0, "little"))
        device.ignore = {10, 11}
        cfg = registers_config(tmp_path, device.port)
        async with running(cfg, writes, ready=("meter.target",)) as agent:
            twin = reader(cfg)
            began = time.monotonic()
            result = await agent.gate.request("meter.target", 50.0, source="operator")
            assert time.monotonic() - began >= 1.4, result  # it kept reading back until readback_timeout
            assert result.reason.startswith("read-back: the device reports 5, expected 50 within 1.5 s"), result
            assert (result.written, result.readback) == (50.0, 5.0)
            await assert_undone(twin, result, 5.0)  # the previous value written back: the device may apply late
            assert await device.holding(10, 2) == float32_registers(5.0, "little")
            twin.close()
    assert [(p, v) for p, v, _ in writes.calls] == [("meter.target", 50.0), ("meter.target", 5.0)]
    writes.assert_all_through_gate()


async def test_small_step_to_a_device_that_ignores_it_is_failed(tmp_path: Path) -> None:
    async with Registers(free_port()) as device:
        await device.set_holding(10, float32_registers(5.0, "little"))
        device.ignore = {10, 11}
        async with running(registers_config(tmp_path, device.port), WriteLog(), ready=("meter.target",)) as agent:
            result = await agent.gate.request("meter.target", 6.0, source="operator")
            assert (result.result, result.readback) == ("failed", 5.0), result


async def test_chiller_with_a_stuck_setpoint_is_marked_failed(tmp_path: Path) -> None:
    writes = WriteLog()
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=8, speed=SPEED,
                     steady_load=True) as plant:
        cfg = plant_config(tmp_path, plant, gate={"readback_timeout": "1.5s"})
        async with running(cfg, writes, ready=("chiller1.setpoint",)) as agent:
            twin = reader(cfg)
            plant.inject_fault("stuck_setpoint")
            result = await agent.gate.request("chiller1.setpoint", 7.5, source="operator")
            assert result.reason.startswith("read-back: the device reports 7, expected 7.5"), result
            assert (result.written, result.readback) == (7.5, 7.0)
            await assert_undone(twin, result, 7.0)
            assert plant.model.chiller_setpoint == 7.0
            assert await opcua_setpoint(plant.opcua_endpoint) == 7.0
            twin.close()
    writes.assert_all_through_gate()


# ---------------------------------------------------------------------------- no other path writes

# Calls of an attribute named `write` that are not driver writes: (file, receiver source text).
NOT_DRIVERS = {
    ("edge_agent/demo/runner.py", "out"),  # the live view's text stream
    ("edge_agent/service/metrics.py", "writer"),  # the HTTP response stream
    ("edge_agent/service/web.py", "writer"),  # the local web page's HTTP response stream
    ("edge_agent/remote/admin.py", "f"),  # atomic_write's temporary file
}
# Where driver writes may be called: the gate, and the drivers themselves (their own helpers).
MAY_WRITE = ("edge_agent/control/gate.py", "drivers/")


def write_calls() -> list[tuple[str, str, int]]:
    """(file, receiver, line) of every `<receiver>.write(...)` call in edge_agent/ and drivers/."""
    found = []
    for path in sorted([*ROOT.glob("edge_agent/**/*.py"), *ROOT.glob("drivers/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write":
                found.append((rel, ast.unparse(node.func.value), node.lineno))
            # getattr(x, "write") would dodge the scan above
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value == "write"):
                found.append((rel, "getattr", node.lineno))
    return found


def test_no_path_but_the_gate_calls_a_driver_write() -> None:
    calls = write_calls()
    assert any(rel == "edge_agent/control/gate.py" and receiver == "driver" for rel, receiver, _ in calls), calls
    offenders = [f"{rel}:{line}: {receiver}.write(...)" for rel, receiver, line in calls
                 if not rel.startswith(MAY_WRITE) and (rel, receiver) not in NOT_DRIVERS]
    assert offenders == [], "a driver write outside the safety gate (or add a non-driver receiver to NOT_DRIVERS)"
    # the allow-list holds no stale entries, so it cannot silently grow
    assert {(rel, receiver) for rel, receiver, _ in calls} >= NOT_DRIVERS


def test_the_scan_catches_a_direct_write(tmp_path: Path) -> None:
    """The scanner itself: a command handler calling a driver's write directly is found."""
    source = "async def handle(agent):\n    await agent.runners['p'].driver.write('x', 1)\n"
    tree = ast.parse(source)
    receivers = [ast.unparse(n.func.value) for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "write"]
    assert receivers == ["agent.runners['p'].driver"]


# ---------------------------------------------------------------------------- the CLI


def test_twin_writes_cli_lists_attempts(tmp_path: Path) -> None:
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(registers_config(tmp_path, free_port()).source.read_text())
    cfg = config_mod.load(cfg_path)
    twin = Twin.open(cfg.twin_path)
    attempts: list[dict[str, Any]] = [
        {"ts": time.time() - 60, "source": "operator", "actor": "ann", "point": "meter.target", "old": 1.0,
         "requested": 2.0, "written": 2.0, "readback": 2.0, "result": "applied", "reason": ""},
        {"ts": time.time() - 30, "source": "optimizer", "actor": None, "point": "meter.mode", "old": 1.0,
         "requested": 500.0, "written": None, "readback": None, "result": "rejected",
         "reason": "500 is outside the safe range 0..100"},
    ]
    for attempt in attempts:
        twin.record_write(attempt)
    twin.close()
    cli: Callable[..., subprocess.CompletedProcess[str]] = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "edge_agent.cli", "twin", "writes", "--config", str(cfg_path), *a],
        capture_output=True, text=True, timeout=60)
    result = cli("--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [{k: r[k] for k in attempts[0]} for r in rows] == attempts
    table = cli()
    assert table.returncode == 0 and "outside the safe range" in table.stdout and "meter.target" in table.stdout

