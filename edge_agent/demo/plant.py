"""A simulated plant behind real protocol servers, for the demo, the tests and the benchmarks.

A chiller is served over OPC UA (an asyncua ``Server``) and the pump of its chilled-water loop
over Modbus TCP (a pymodbus ``ModbusTcpServer``), both on loopback. The physics lives in
:mod:`edge_agent.demo.physics`; this module serves it.

Chiller1 (OPC UA, namespace ``urn:edge-agent:demo-plant``, node ids ``s=Chiller1.<Name>``, Double):

=============  =====  ============================================================
SupplyTemp     degC   follows Setpoint with a first-order lag; rises when overloaded
ReturnTemp     degC   SupplyTemp + Load / (1.163 * loop flow from the pump)
Power          kW     electric; falls ~2.5 %/degC as the supply temperature rises
Vibration      mm/s   compressor casing; ~2 normally, ramps to ~9 with a bearing fault
Load           kW     thermal load of the building: slow swings plus noise
Setpoint       degC   writable; clamped to 4..15 by the chiller's controller
Energy         kWh    the chiller's own energy meter (integrated electric power)
=============  =====  ============================================================

Pump1 (Modbus TCP, unit 1; float32 spans two registers, high word first unless noted):

=====================  =================================  =======
holding 0-1            flow, float32 big word order       m3/h
holding 2-3            discharge pressure, float32 big    bar
holding 4              speed, uint16                      rpm
holding 6-7            electric power, float32 big        kW
holding 10-11          flow total, float32 LITTLE order   m3
holding 20             speed setpoint, uint16, writable   rpm (clamped 0..1800)
input 0                motor temperature, int16 x10       degC (235 = 23.5)
coil 0                 running (run command; write 0 to stop)
discrete 0             motor over-temperature alarm (> 80 degC)
=====================  =================================  =======

Faults (``Plant.inject_fault``): ``vibration`` (a failing bearing: vibration ramps up over about
a minute of simulated time), ``sensor_drift`` (the supply temperature sensor drifts away from
the truth), ``stuck_setpoint`` (the chiller controller ignores setpoint writes and reverts them).

Besides the real plant, a *baseline* twin of it runs in lockstep with the same seed and load but
its setpoints left at their defaults and no faults; ``snapshot()`` reports both energy meters, so
savings are measured on the plant, not predicted by a model.

Run standalone: ``python -m edge_agent.demo.plant --opcua-port 48400 --modbus-port 15020``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import struct
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, cast

from asyncua import Server, ua
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.demo.physics import CHILLER_SETPOINT_RANGE, FAULTS, PUMP_SPEED_RANGE, PlantModel, clamp

logger = logging.getLogger(__name__)

NAMESPACE_URI = "urn:edge-agent:demo-plant"
PUMP_UNIT_ID = 1
MIN_TICK = 0.02  # real seconds between simulation ticks at high speed; each tick runs several steps


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- servers


CHILLER_NODES = {  # OPC UA browse name -> reading name
    "SupplyTemp": "chiller1.supply_temp", "ReturnTemp": "chiller1.return_temp",
    "Power": "chiller1.power", "Vibration": "chiller1.vibration", "Load": "chiller1.load",
    "Setpoint": "chiller1.setpoint", "Energy": "chiller1.energy",
}


class ChillerServer:
    """The chiller's OPC UA server: one object ``Chiller1`` with a Double variable per reading."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/plant"
        self.online = False
        self._server: Server | None = None
        self._nodes: dict[str, ua.NodeId] = {}

    async def start(self, readings: dict[str, float]) -> None:
        """Build the address space (about a second: asyncua loads the standard nodes) and listen."""
        server = Server()
        await server.init()
        server.disable_clock()  # the 1 s clock task would make every stop wait up to a second
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-agent demo plant")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(NAMESPACE_URI)
        objects = server.nodes.objects
        chiller = await objects.add_object(f"ns={ns};s=Chiller1", ua.QualifiedName("Chiller1", ns))
        for name, reading in CHILLER_NODES.items():
            node = await chiller.add_variable(f"ns={ns};s=Chiller1.{name}", ua.QualifiedName(name, ns),
                                              readings[reading], ua.VariantType.Double)
            self._nodes[reading] = node.nodeid
        await server.get_node(self._nodes["chiller1.setpoint"]).set_writable()
        self._server = server
        await server.start()
        self.online = True
        logger.info("chiller OPC UA server listening on %s", self.endpoint)

    async def set_online(self, online: bool) -> None:
        """Close or reopen the listening socket on the same port; the address space is kept.

        Only asyncua's network layer (``Server.bserver``) is cycled: a full ``stop()``/``start()``
        would register the endpoints a second time, and a new Server costs a second to build.
        """
        network = self._server.bserver if self._server is not None else None
        if network is None or online == self.online:
            return
        if online:
            await network.start()
        else:
            await network.stop()  # closes every client connection too
        self.online = online
        logger.info("chiller OPC UA server %s", "back online" if online else "taken offline")

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        self._server = None
        self.online = False

    def setpoint(self) -> float | None:
        """The setpoint as last written by a client (or by the plant)."""
        if self._server is None:
            return None
        value = self._server.read_attribute_value(self._nodes["chiller1.setpoint"]).Value
        return float(value.Value) if value is not None and isinstance(value.Value, (int, float)) else None

    async def write_setpoint(self, value: float) -> None:
        """Overwrite the setpoint node (the controller clamped or refused a client's write)."""
        await self._write("chiller1.setpoint", value, datetime.now(UTC))

    async def publish(self, readings: dict[str, float]) -> None:
        """Write every measured value; the setpoint is left alone so a client's write is never lost."""
        now = datetime.now(UTC)
        for reading in self._nodes:
            if reading != "chiller1.setpoint":
                await self._write(reading, readings[reading], now)

    async def _write(self, reading: str, value: float, now: datetime) -> None:
        if self._server is not None:
            stamp = cast(ua.DateTime, now)  # ua.DateTime is a datetime subclass only for typing
            data = ua.DataValue(ua.Variant(value, ua.VariantType.Double), SourceTimestamp=stamp,
                                ServerTimestamp=stamp)
            await self._server.write_attribute_value(self._nodes[reading], data)


def float32_registers(value: float, word_order: str = "big") -> list[int]:
    """Encode a float32 into two registers, high word first (``big``) or low word first."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return [high, low] if word_order == "big" else [low, high]


class PumpServer:
    """The pump's Modbus TCP server (unit 1); a new pymodbus server each time it comes online."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: ModbusTcpServer | None = None

    @property
    def online(self) -> bool:
        return self._server is not None

    async def start(self, readings: dict[str, float]) -> None:
        if self._server is not None:
            return
        coils = [SimData(0, values=[bool(readings["pump1.running"])] + [False] * 15, datatype=DataType.BITS)]
        discretes = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        holding = [SimData(0, count=32, values=0, datatype=DataType.REGISTERS)]
        inputs = [SimData(0, count=8, values=0, datatype=DataType.REGISTERS)]
        device = SimDevice(PUMP_UNIT_ID, simdata=(coils, discretes, holding, inputs))
        server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
        await server.serve_forever(background=True)
        self._server = server
        await server.async_setValues(PUMP_UNIT_ID, 6, 20, [int(readings["pump1.speed_setpoint"])])
        await self.publish(readings)
        logger.info("pump Modbus server listening on 127.0.0.1:%d", self.port)

    async def stop(self) -> None:
        """Close the listener and every client connection; the port is free on return."""
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
            logger.info("pump Modbus server on port %d stopped", self.port)

    async def commands(self) -> tuple[int, bool] | None:
        """The speed setpoint (holding 20) and run command (coil 0) as clients left them."""
        if self._server is None:
            return None
        speed = await self._server.async_getValues(PUMP_UNIT_ID, 3, 20, 1)
        run = await self._server.async_getValues(PUMP_UNIT_ID, 1, 0, 1)
        return int(speed[0]), bool(run[0])

    async def set_speed_setpoint(self, rpm: int) -> None:
        if self._server is not None:
            await self._server.async_setValues(PUMP_UNIT_ID, 6, 20, [rpm])

    async def publish(self, readings: dict[str, float]) -> None:
        if self._server is None:
            return
        holding = (float32_registers(readings["pump1.flow"]) + float32_registers(readings["pump1.pressure"])
                   + [int(readings["pump1.speed"]), 0] + float32_registers(readings["pump1.power"]))
        motor = round(readings["pump1.motor_temp"] * 10) & 0xFFFF  # int16, two's complement
        await self._server.async_setValues(PUMP_UNIT_ID, 16, 0, holding)
        await self._server.async_setValues(PUMP_UNIT_ID, 16, 10, float32_registers(
            readings["pump1.flow_total"], "little"))
        await self._server.async_setValues(PUMP_UNIT_ID, 4, 0, [motor])
        await self._server.async_setValues(PUMP_UNIT_ID, 2, 0, [bool(readings["pump1.overtemp"])])


# --------------------------------------------------------------------------- the plant


class Plant:
    """The simulated plant: physics stepped on the event loop, served over OPC UA and Modbus.

    ``speed`` is simulated seconds per real second; ``step`` the simulated seconds per physics step.
    """

    def __init__(self, opcua_port: int, modbus_port: int, *, seed: int = 1, step: float = 0.2,
                 speed: float = 1.0, steady_load: bool = False) -> None:
        if step <= 0 or speed <= 0:
            raise ValueError("step and speed must be above 0")
        self.model = PlantModel(seed, steady_load=steady_load)
        self.baseline = PlantModel(seed, steady_load=steady_load)
        self._step = step
        self._speed = speed
        self._chiller = ChillerServer(opcua_port)
        self._pump = PumpServer(modbus_port)
        self._task: asyncio.Task[None] | None = None

    @property
    def opcua_endpoint(self) -> str:
        return self._chiller.endpoint

    @property
    def opcua_port(self) -> int:
        return self._chiller.port

    @property
    def modbus_port(self) -> int:
        return self._pump.port

    @property
    def opcua_online(self) -> bool:
        return self._chiller.online

    @property
    def modbus_online(self) -> bool:
        return self._pump.online

    async def start(self) -> None:
        """Start both servers and the simulation task."""
        await self._chiller.start(self.model.readings)
        try:
            await self._pump.start(self.model.readings)
        except BaseException:
            await self._chiller.stop()
            raise
        self._task = asyncio.create_task(self._run(), name="plant-simulation")
        self._task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        """Stop the simulation and both servers; their ports are free again on return."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._pump.stop()
        await self._chiller.stop()

    async def __aenter__(self) -> Plant:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def set_opcua_online(self, online: bool) -> None:
        """Take the chiller's OPC UA server off the network or bring it back on the same port."""
        await self._chiller.set_online(online)

    async def set_modbus_online(self, online: bool) -> None:
        """Take the pump's Modbus server off the network or bring it back on the same port."""
        if online:
            await self._pump.start(self.model.readings)
        else:
            await self._pump.stop()

    def inject_fault(self, kind: str) -> None:
        """Start a fault: one of ``vibration``, ``sensor_drift``, ``stuck_setpoint``."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}, expected one of {', '.join(FAULTS)}")
        self.model.fault = kind
        self.model.fault_age = 0.0
        logger.info("fault injected: %s at %.0f s", kind, self.model.elapsed)

    async def operator_setpoint(self, value: float) -> float:
        """An operator sets the chiller's supply setpoint on its own panel (not through any client):
        the plant takes it on its next tick. Returns the value, clamped to the chiller's range."""
        value = clamp(value, *CHILLER_SETPOINT_RANGE)
        await self._chiller.write_setpoint(value)
        logger.info("operator on the chiller's panel: setpoint %.2f degC", value)
        return value

    def clear_fault(self) -> None:
        """End the current fault (the plant returns to normal behaviour at once)."""
        self.model.fault = None
        self.model.fault_age = 0.0

    def snapshot(self) -> dict[str, Any]:
        """True current values, the energy meters and the baseline's meters, for summaries."""
        return {
            **self.model.truth(),
            "elapsed_s": self.model.elapsed,
            "fault": self.model.fault,
            "baseline.chiller1.energy": self.baseline.chiller_energy,
            "baseline.pump1.energy": self.baseline.pump_energy,
            "baseline.chiller1.supply_temp": self.baseline.supply_temp,
        }

    def readings(self) -> dict[str, float]:
        """What the servers publish right now (instrument readings, noise and faults included)."""
        return dict(self.model.readings)

    async def _run(self) -> None:
        steps_per_tick = max(1, round(MIN_TICK * self._speed / self._step))
        tick = steps_per_tick * self._step / self._speed
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            await self._take_commands()
            for _ in range(steps_per_tick):
                self.model.step(self._step)
                self.baseline.step(self._step)
            await self._publish()
            next_tick += tick
            delay = next_tick - loop.time()
            if delay < -10 * tick:  # far behind (a stalled loop): slow down instead of racing
                next_tick = loop.time()
            await asyncio.sleep(max(delay, 0.0))

    async def _take_commands(self) -> None:
        """Apply what clients wrote: the chiller setpoint and the pump's speed and run commands."""
        model = self.model
        written = self._chiller.setpoint()
        if written is not None and written != model.chiller_setpoint:
            if model.fault == "stuck_setpoint":
                await self._chiller.write_setpoint(model.chiller_setpoint)  # the controller ignores it
            else:
                model.chiller_setpoint = clamp(written, *CHILLER_SETPOINT_RANGE)
                if model.chiller_setpoint != written:
                    await self._chiller.write_setpoint(model.chiller_setpoint)
                logger.info("chiller setpoint %.2f degC (written %.2f)", model.chiller_setpoint, written)
        commands = await self._pump.commands()
        if commands is not None:
            speed, model.pump_run = commands
            clamped = int(clamp(speed, *PUMP_SPEED_RANGE))
            if clamped != speed:
                await self._pump.set_speed_setpoint(clamped)
            model.pump_speed_setpoint = clamped

    async def _publish(self) -> None:
        readings = self.model.readings
        if self._chiller.online:
            await self._chiller.publish(readings)
        await self._pump.publish(readings)


def _log_crash(task: asyncio.Task[None]) -> None:
    """Make a dead simulation loud at once rather than only when the plant is stopped."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("plant simulation stopped", exc_info=task.exception())


# --------------------------------------------------------------------------- standalone


async def _serve(args: argparse.Namespace) -> None:
    plant = Plant(args.opcua_port, args.modbus_port, seed=args.seed, step=args.step, speed=args.speed)
    async with plant:
        print(f"chiller OPC UA: {plant.opcua_endpoint}  (namespace {NAMESPACE_URI})")
        print(f"pump Modbus TCP: 127.0.0.1:{plant.modbus_port} unit {PUMP_UNIT_ID}")
        print("Ctrl-C to stop")
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """Run the simulated plant until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m edge_agent.demo.plant",
                                     description="Run the simulated demo plant.")
    parser.add_argument("--opcua-port", type=int, default=48400)
    parser.add_argument("--modbus-port", type=int, default=15020)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--step", type=float, default=0.2, help="simulated seconds per physics step")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # asyncua warns about unsigned endpoints on every start; they are on purpose
        logging.getLogger("asyncua").setLevel(logging.ERROR)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
