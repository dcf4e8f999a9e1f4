"""The simulated plant, checked from outside with real asyncua and pymodbus clients."""

from __future__ import annotations

import socket
import statistics
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from asyncua import Client, Node, ua
from pymodbus.client import AsyncModbusTcpClient

from edge_agent.config import ModbusPoint, OpcUaPoint, load
from edge_agent.demo.physics import PlantModel
from edge_agent.demo.plant import CHILLER_NODES, NAMESPACE_URI, Plant
from tests.helpers import free_port, wait_for

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "edge_agent" / "demo" / "demo.toml"
FLOAT32 = AsyncModbusTcpClient.DATATYPE.FLOAT32
INT16 = AsyncModbusTcpClient.DATATYPE.INT16


def make_plant(**kwargs: object) -> Plant:
    return Plant(free_port(), free_port(), **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def chiller_client(plant: Plant) -> AsyncIterator[dict[str, Node]]:
    """A connected OPC UA client; yields the Chiller1 nodes by browse name."""
    client = Client(plant.opcua_endpoint, timeout=2)
    async with client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        yield {name: client.get_node(f"ns={ns};s=Chiller1.{name}") for name in CHILLER_NODES}


@asynccontextmanager
async def pump_client(plant: Plant) -> AsyncIterator[AsyncModbusTcpClient]:
    client = AsyncModbusTcpClient("127.0.0.1", port=plant.modbus_port, timeout=2, retries=0)
    assert await client.connect()
    try:
        yield client
    finally:
        client.close()


async def read_chiller(nodes: dict[str, Node]) -> dict[str, float]:
    return {name: float(await node.read_value()) for name, node in nodes.items()}


async def read_pump(client: AsyncModbusTcpClient) -> dict[str, float]:
    """Decode the pump's registers the way the docs of edge_agent.demo.plant describe them."""
    holding = (await client.read_holding_registers(0, count=12, device_id=1)).registers
    motor = (await client.read_input_registers(0, count=1, device_id=1)).registers
    running = (await client.read_coils(0, count=1, device_id=1)).bits[0]
    alarm = (await client.read_discrete_inputs(0, count=1, device_id=1)).bits[0]
    setpoint = (await client.read_holding_registers(20, count=1, device_id=1)).registers[0]
    return {
        "pump1.flow": decode(holding[0:2], FLOAT32, "big"),
        "pump1.pressure": decode(holding[2:4], FLOAT32, "big"),
        "pump1.speed": float(holding[4]),
        "pump1.power": decode(holding[6:8], FLOAT32, "big"),
        "pump1.flow_total": decode(holding[10:12], FLOAT32, "little"),
        "pump1.motor_temp": decode(motor, INT16, "big") / 10,
        "pump1.running": float(running),
        "pump1.overtemp": float(alarm),
        "pump1.speed_setpoint": float(setpoint),
    }


def decode(registers: list[int], kind: Any, word_order: Literal["big", "little"]) -> float:
    """pymodbus's own decoder, so the plant's encoding is checked against an independent one."""
    value = AsyncModbusTcpClient.convert_from_registers(registers, kind, word_order=word_order)
    assert isinstance(value, (int, float))
    return float(value)


def close(a: float, b: float, tolerance: float = 1e-4) -> bool:
    """float32 on the wire keeps about seven digits."""
    return abs(a - b) <= tolerance * max(1.0, abs(b))


def port_is_free(port: int) -> bool:
    """True when a server could listen on the port now (SO_REUSEADDR, as asyncio servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


async def test_values_appear_move_and_decode_as_documented() -> None:
    plant = make_plant(speed=50.0)
    async with plant, chiller_client(plant) as nodes, pump_client(plant) as pump:
        first = await read_chiller(nodes)
        assert 4.0 <= first["SupplyTemp"] <= 15.0
        assert first["ReturnTemp"] > first["SupplyTemp"] + 1.0
        assert 20.0 < first["Power"] < 150.0
        assert first["Setpoint"] == 7.0
        first_pump = await read_pump(pump)
        assert 60.0 < first_pump["pump1.flow"] < 85.0
        assert 50.0 <= first_pump["pump1.motor_temp"] <= 60.0  # int16 x10 at rated speed
        assert first_pump["pump1.running"] == 1.0

        async def moved() -> bool:
            chiller, pump_now = await read_chiller(nodes), await read_pump(pump)
            return all(chiller[name] != first[name] for name in ("Load", "Power", "Energy")) and (
                pump_now["pump1.flow_total"] > first_pump["pump1.flow_total"] > 0.0)

        async def decoded_matches() -> dict[str, float] | None:
            # The plant ticks between requests; retry until one read falls within one tick.
            decoded, published = await read_pump(pump), plant.readings()
            same = all(close(value, published[name]) for name, value in decoded.items())
            return decoded if same else None

        await wait_for(moved, timeout=5, what="chiller and pump values to move")
        await wait_for(decoded_matches, timeout=5, what="registers to decode to the plant's readings")
    assert port_is_free(plant.opcua_port) and port_is_free(plant.modbus_port)


async def test_pump_follows_its_speed_setpoint() -> None:
    plant = make_plant(speed=100.0)
    async with plant, pump_client(plant) as pump:
        await pump.write_register(20, 1000, device_id=1)
        snapshot = await wait_for(lambda: (s := plant.snapshot())["pump1.speed"] < 1100 and s,
                                  timeout=5, what="the pump to slow down")
        assert snapshot["pump1.speed_setpoint"] == 1000.0
        assert snapshot["pump1.flow"] < 55.0

        await pump.write_register(20, 3000, device_id=1)  # beyond the drive's range: clamped
        await wait_for(lambda: plant.snapshot()["pump1.speed_setpoint"] == 1800.0, timeout=5)
        assert (await pump.read_holding_registers(20, count=1, device_id=1)).registers == [1800]

        await pump.write_coil(0, False, device_id=1)  # the run command: stop
        await wait_for(lambda: plant.snapshot()["pump1.speed"] == 0.0, timeout=5, what="the pump to stop")
        assert (await read_pump(pump))["pump1.flow"] == 0.0


async def test_power_falls_when_the_setpoint_rises() -> None:
    plant = make_plant(speed=1000.0, steady_load=True)
    async with plant, chiller_client(plant) as nodes:
        async def settled_power(setpoint: float) -> float:
            await nodes["Setpoint"].write_value(ua.Variant(setpoint, ua.VariantType.Double))
            await wait_for(lambda: abs(plant.snapshot()["chiller1.supply_temp"] - setpoint) < 0.05,
                           timeout=10, interval=0.01, what=f"supply temperature to settle at {setpoint}")
            samples = [float(await nodes["Power"].read_value())]
            while len(samples) < 5:
                value = await wait_for(lambda: _changed(nodes["Power"], samples[-1]), timeout=5, interval=0.01)
                samples.append(value)
            return statistics.fmean(samples)

        cold = await settled_power(6.0)
        warm = await settled_power(10.0)
    # 4 degC warmer water: some 8-12 % less power; noise is well under 1 %.
    assert warm < cold * 0.94, (cold, warm)
    assert warm > cold * 0.80, (cold, warm)


async def _changed(node: Node, last: float) -> float | None:
    value = float(await node.read_value())
    return value if value != last else None


async def test_setpoint_is_clamped_to_the_chiller_range() -> None:
    plant = make_plant(speed=50.0)
    async with plant, chiller_client(plant) as nodes:
        await nodes["Setpoint"].write_value(ua.Variant(25.0, ua.VariantType.Double))
        await wait_for(lambda: plant.snapshot()["chiller1.setpoint"] == 15.0, timeout=5)
        assert await wait_for(lambda: _changed(nodes["Setpoint"], 25.0), timeout=5) == 15.0

        plant.inject_fault("stuck_setpoint")
        await nodes["Setpoint"].write_value(ua.Variant(8.0, ua.VariantType.Double))
        assert await wait_for(lambda: _changed(nodes["Setpoint"], 8.0), timeout=5) == 15.0
        assert plant.snapshot()["chiller1.setpoint"] == 15.0


async def test_vibration_fault_raises_vibration_well_above_baseline() -> None:
    plant = make_plant(speed=300.0)
    async with plant, chiller_client(plant) as nodes:
        baseline = [float(await nodes["Vibration"].read_value())]
        while len(baseline) < 5:
            baseline.append(await wait_for(lambda: _changed(nodes["Vibration"], baseline[-1]), timeout=5,
                                           interval=0.01))
        normal = statistics.fmean(baseline)
        assert 1.5 < normal < 3.5

        plant.inject_fault("vibration")
        assert plant.snapshot()["fault"] == "vibration"

        async def vibration_high() -> float | None:
            value = float(await nodes["Vibration"].read_value())
            return value if value > 3 * normal else None

        await wait_for(vibration_high, timeout=5, what="vibration to rise")
        assert plant.snapshot()["elapsed_s"] > 30.0  # a ramp over sim time, not a step

        plant.clear_fault()
        await wait_for(lambda: plant.readings()["chiller1.vibration"] < 1.5 * normal, timeout=5)


async def test_servers_go_offline_and_come_back_on_the_same_port() -> None:
    plant = make_plant(speed=20.0)
    async with plant:
        async with chiller_client(plant) as nodes:
            before = float(await nodes["Energy"].read_value())
            await plant.set_opcua_online(False)
            assert not plant.opcua_online
            assert port_is_free(plant.opcua_port)
        await plant.set_modbus_online(False)
        assert port_is_free(plant.modbus_port)

        await plant.set_opcua_online(True)
        await plant.set_modbus_online(True)
        async with chiller_client(plant) as nodes:
            assert plant.opcua_endpoint.endswith(f":{plant.opcua_port}/plant")
            await wait_for(lambda: _changed(nodes["Energy"], before), timeout=5, what="energy to move")
        async with pump_client(plant) as pump:
            values = await read_pump(pump)
            assert values["pump1.speed_setpoint"] == 1450.0
            assert values["pump1.flow"] > 60.0
    assert port_is_free(plant.opcua_port) and port_is_free(plant.modbus_port)


def test_model_is_deterministic_and_load_ignores_the_setpoints() -> None:
    a, b, c = PlantModel(7), PlantModel(7), PlantModel(8)
    b.chiller_setpoint = 11.0
    loads = []
    for _ in range(600):
        for model in (a, b, c):
            model.step(1.0)
        loads.append((a.load, b.load, c.load))
    assert all(la == lb for la, lb, _ in loads)  # same seed: same load, whatever the setpoint
    assert any(la != lc for la, _, lc in loads)
    assert PlantModel(7).readings == PlantModel(7).readings
    assert b.chiller_energy < a.chiller_energy  # warmer water, less energy over the same load


def test_sensor_drift_moves_the_reading_away_from_the_truth() -> None:
    model = PlantModel(3, steady_load=True)
    model.fault = "sensor_drift"
    for _ in range(120):
        model.step(1.0)
    error = model.readings["chiller1.supply_temp"] - model.supply_temp
    assert error > 2.0
    assert abs(model.supply_temp - model.chiller_setpoint) < 0.2  # the water itself is fine


def test_demo_config_loads_and_mirrors_every_plant_point() -> None:
    config = load(DEMO_CONFIG)
    chiller, pump = config.devices
    assert isinstance(chiller.points[0], OpcUaPoint) and isinstance(pump.points[0], ModbusPoint)
    nodes = {p.name: p.node for p in chiller.points if isinstance(p, OpcUaPoint)}
    assert nodes == {reading: f"nsu={NAMESPACE_URI};s=Chiller1.{name}" for name, reading in CHILLER_NODES.items()}
    mirrored = {p.name for _, p in config.points()}
    assert mirrored == set(PlantModel().readings)
    assert all(p.unit for _, p in config.points() if p.name not in ("pump1.running", "pump1.overtemp"))
    writable = {p.name: (p.min, p.max, p.max_step, p.min_interval) for _, p in config.points() if p.writable}
    assert writable["chiller1.setpoint"] == (5.0, 12.0, 0.5, 10.0)
    assert set(writable) == {"chiller1.setpoint", "pump1.speed_setpoint"}
