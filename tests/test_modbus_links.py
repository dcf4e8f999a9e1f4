"""Modbus devices sharing a connection (a TCP gateway, an RTU line) against real pymodbus servers.

The server holds several units; a unit in ``Gateway.silent`` gets no answer, as from a drive that
is switched off behind a gateway: pymodbus's ``trace_packet`` hook drops that unit's response
frames before they are sent (pymodbus 3.16's simulator answers an unknown unit id with an
exception response instead of staying silent, so ``ignore_missing_devices`` cannot do it). The
RTU cases run over a real pseudo-terminal pair joined by socat (tests/serial_line.py), not
pyserial's ``socket://``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers import modbus_link
from drivers.base import BAD, GOOD, Reading
from drivers.modbus import ModbusDriver
from drivers.modbus_codec import encode
from edge_agent.config import ModbusDevice, ModbusPoint
from edge_agent.device import DeviceRunner
from edge_agent.errors import ReadError
from tests.helpers import free_port, wait_for
from tests.serial_line import pty_pair


@dataclass
class Gateway:
    """A pymodbus server with ``units`` (holding 0..99 each, register i of unit u = 100 * u + i) that
    answers none of the units in ``silent``.

    ``requests`` holds (monotonic time, unit id, function code) of every request that reached it;
    ``connects`` and ``disconnects`` count its client connections.
    """

    units: Sequence[int]
    rtu: bool = False
    silent: set[int] = field(default_factory=set)
    requests: list[tuple[float, int, int]] = field(default_factory=list)
    connects: int = 0
    disconnects: int = 0
    server: ModbusTcpServer | ModbusSerialServer | None = None

    def devices(self) -> list[SimDevice]:
        return [SimDevice(id=unit, simdata=(
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=[unit * 100 + i for i in range(100)], datatype=DataType.REGISTERS)],
            [SimData(0, count=100, datatype=DataType.REGISTERS)],
        )) for unit in self.units]

    def _pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append((time.monotonic(), pdu.dev_id, pdu.function_code))
        return pdu

    def _packet(self, sending: bool, data: bytes) -> bytes:
        if sending and data:
            unit = data[0] if self.rtu else data[6]  # RTU: address first; TCP: after the 6-byte MBAP prefix
            if unit in self.silent:
                return b""  # nothing goes on the wire: the client waits for its timeout
        return data

    def _connect(self, connected: bool) -> None:
        if connected:
            self.connects += 1
        else:
            self.disconnects += 1

    def times(self, unit: int) -> list[float]:
        return [t for t, u, _ in self.requests if u == unit]

    async def set(self, unit: int, address: int, values: list[int]) -> None:
        assert self.server is not None
        await self.server.async_setValues(unit, 16, address, values)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None


@asynccontextmanager
async def tcp_gateway(units: Sequence[int], silent: Sequence[int] = ()) -> AsyncIterator[tuple[Gateway,
                                                                                               dict[str, Any]]]:
    """A Modbus TCP gateway on a free port; yields it and the device settings that reach it (shared connection)."""
    gateway = Gateway(units, silent=set(silent))
    port = free_port()
    gateway.server = ModbusTcpServer(gateway.devices(), address=("127.0.0.1", port), trace_packet=gateway._packet,
                                     trace_pdu=gateway._pdu, trace_connect=gateway._connect)
    await gateway.server.serve_forever(background=True)
    try:
        yield gateway, {"protocol": "modbus", "host": "127.0.0.1", "port": port, "connection": "shared"}
    finally:
        await gateway.stop()


@asynccontextmanager
async def rtu_line(units: Sequence[int], folder: Path, silent: Sequence[int] = ()) -> AsyncIterator[
        tuple[Gateway, dict[str, Any]]]:
    """An RTU bus: a pymodbus RTU server on one end of a socat pty pair; the devices get the other end."""
    gateway = Gateway(units, rtu=True, silent=set(silent))
    with pty_pair(folder) as (server_end, agent_end):
        # Parity "N": a pty carries bytes, not bits, and Linux refuses (EINVAL) a tcsetattr on a pty
        # whose only change is the parity, which a reopen with parity "E" would be.
        gateway.server = ModbusSerialServer(gateway.devices(), port=server_end, baudrate=19200, parity="N",
                                            trace_packet=gateway._packet, trace_pdu=gateway._pdu,
                                            trace_connect=gateway._connect)
        await gateway.server.serve_forever(background=True)
        try:
            yield gateway, {"protocol": "modbus-rtu", "serial_port": agent_end, "baudrate": 19200, "parity": "N"}
        finally:
            await gateway.stop()


def unit_device(name: str, unit: int, link: dict[str, Any], points: Sequence[ModbusPoint] = (),
                **kw: Any) -> ModbusDevice:
    """A device for ``unit`` on the link, with one uint16 point ``NAME.r0`` at holding 0 by default."""
    points = tuple(points) or (ModbusPoint(name=f"{name}.r0", address=0),)
    settings = {"interval": 0.1, "timeout": 0.5, "retry_min": 0.1, "retry_max": 3.2, **link, **kw}
    return ModbusDevice(name=name, unit_id=unit, points=points, **settings)


# --------------------------------------------------------------------------- one connection per address


async def test_devices_on_one_address_share_one_connection_and_the_last_closes_it() -> None:
    async with tcp_gateway([1, 2, 3]) as (gateway, link):
        drivers = [ModbusDriver(unit_device(f"drive{u}", u, link), Path(".")) for u in (1, 2, 3)]
        for driver in drivers:
            await driver.connect()
        values = {r.point: r.value for d in drivers for r in await d.read()}
        assert values == {"drive1.r0": 100, "drive2.r0": 200, "drive3.r0": 300}  # each its own unit
        assert [u for _, u, _ in gateway.requests] == [1, 2, 3]
        assert gateway.connects == 1
        [shared] = modbus_link.links()
        assert shared.users == 3 and shared.where == f"127.0.0.1:{link['port']}"

        await drivers[0].close()
        assert (await drivers[1].read())[0].value == 200  # the others keep it
        await drivers[1].close()
        await drivers[2].close()
        await wait_for(lambda: gateway.disconnects == 1, what="the connection closed by the last device")
        assert modbus_link.links() == ()


async def test_devices_with_their_own_connection_do_not_share_even_on_one_address() -> None:
    async with tcp_gateway([1, 2], silent=[2]) as (gateway, link):
        own = {**link, "connection": "own"}  # the default
        one = ModbusDriver(unit_device("one", 1, own), Path("."))
        two = ModbusDriver(unit_device("two", 2, own, timeout=0.2), Path("."))
        async with one, two:
            assert len(modbus_link.links()) == 2
            assert (await one.read())[0].value == 100
            with pytest.raises(ReadError, match="no answer from unit 2"):
                await two.read()
            await wait_for(lambda: gateway.disconnects == 1, what="unit 2's own connection closed")
            assert (await one.read())[0].value == 100  # its own connection: untouched
        assert gateway.connects == 2


async def test_writes_and_reads_of_units_on_one_connection_carry_their_own_unit_id() -> None:
    async with tcp_gateway([1, 2]) as (gateway, link):
        setpoint = ModbusPoint(name="sp", address=10, type="float32", writable=True, min=0.0, max=100.0,
                               word_order="little", byte_order="little")
        one = ModbusDriver(unit_device("one", 1, link, [setpoint]), Path("."))
        two = ModbusDriver(unit_device("two", 2, link), Path("."))
        async with one, two:
            await one.write("sp", 42.5)
            assert (await one.read())[0].value == 42.5
            assert (await two.read())[0].value == 200
        assert [(u, fc) for _, u, fc in gateway.requests] == [(1, 16), (1, 3), (2, 3)]
        assert gateway.connects == 1


# --------------------------------------------------------------------------- a dead unit


@asynccontextmanager
async def runners(devices: Sequence[ModbusDevice]) -> AsyncIterator[tuple[dict[str, DeviceRunner],
                                                                          dict[str, Reading]]]:
    """The agent's device supervisors with the real Modbus driver; yields them and the latest reading per point."""
    latest: dict[str, Reading] = {}

    def submit(readings: Sequence[Reading]) -> None:
        latest.update((r.point, r) for r in readings)

    supervisors = {d.name: DeviceRunner(d, Path("."), submit, latest.get) for d in devices}
    tasks = [asyncio.create_task(r.run()) for r in supervisors.values()]
    try:
        yield supervisors, latest
    finally:
        for runner in supervisors.values():
            runner.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("line", ["tcp", "rtu"])
async def test_a_dead_unit_backs_off_alone_while_the_live_units_keep_their_interval(line: str,
                                                                                   tmp_path: Path) -> None:
    dead, window = 3, 3.0
    opened = tcp_gateway([1, 2, 3], silent=[dead]) if line == "tcp" else rtu_line([1, 2, 3], tmp_path, silent=[dead])
    async with opened as (gateway, link):
        devices = [unit_device(f"drive{u}", u, link, timeout=0.2 if u == dead else 1.0) for u in (1, 2, dead)]
        async with runners(devices) as (sup, latest):
            live = [sup["drive1"], sup["drive2"]]
            # Once the dead unit has failed four times its backoff is past 0.8 s: measure from there.
            await wait_for(lambda: sup["drive3"].status.failures >= 4, timeout=20, what="drive3 failing 4 times")
            reads_before = [r.status.reads for r in live]
            started = time.monotonic()
            await asyncio.sleep(window)
            elapsed = time.monotonic() - started
            reads = [r.status.reads - before for r, before in zip(live, reads_before, strict=True)]
            dead_status = copy.copy(sup["drive3"].status)
            quality = {name: reading.quality for name, reading in latest.items()}

            switched_on = time.monotonic()
            gateway.silent.clear()  # the drive is switched back on: its next retry brings it back
            await wait_for(lambda: latest["drive3.r0"].quality == GOOD and sup["drive3"].status.state == "up",
                           timeout=10, what="drive3 back")
            assert latest["drive3.r0"].value == 300

    ticks = elapsed / 0.1
    probes = [t for t in gateway.times(dead) if started <= t <= started + elapsed]
    retries = [t for t in gateway.times(dead) if t < switched_on]  # not the reads once it answers again
    gaps = [b - a for a, b in itertools.pairwise(retries)]
    # The live units kept (most of) their 0.1 s interval: each probe of the dead one holds the line
    # for its 0.2 s timeout, and backoff makes the probes rare. Without the backoff the dead unit
    # would be asked every ~0.3 s and hold the line two thirds of the time.
    assert min(reads) >= 0.6 * ticks, (reads, ticks, len(probes))
    assert 1 <= len(probes) <= 4, probes
    assert gaps[-1] > gaps[0] + 0.4, gaps  # the dead unit's retries spread out (capped exponential backoff)
    assert (dead_status.state, dead_status.failures >= 4) == ("down", True)
    assert "no answer from unit 3" in dead_status.last_error
    assert all(r.status.state == "up" and r.status.failures == 0 for r in live)
    assert quality == {"drive1.r0": GOOD, "drive2.r0": GOOD, "drive3.r0": BAD}
    assert gateway.connects == 1  # one connection (or one open serial port) all along


async def test_a_silent_unit_keeps_the_connection_but_no_answer_from_anyone_reopens_it() -> None:
    async with tcp_gateway([1, 5, 6], silent=[5, 6]) as (gateway, link):
        alive = ModbusDriver(unit_device("alive", 1, link), Path("."))
        gone = ModbusDriver(unit_device("gone", 5, link, timeout=0.2), Path("."))
        also_gone = ModbusDriver(unit_device("also_gone", 6, link, timeout=0.2), Path("."))
        for driver in (alive, gone, also_gone):
            await driver.connect()
        with pytest.raises(ReadError, match=r'device "gone": reading holding 0\.\.0: no answer from unit 5 at '):
            await gone.read()
        assert (await alive.read())[0].value == 100  # the same connection still carries unit 1
        await alive.close()  # now only silent units hold the link
        with pytest.raises(ReadError, match="no answer from unit 5"):
            await gone.read()
        assert gateway.disconnects == 0  # unit 6 has not been asked: the connection may be fine
        with pytest.raises(ReadError, match="no answer from unit 6"):
            await also_gone.read()
        await wait_for(lambda: gateway.disconnects == 1, what="the dead connection closed")
        with pytest.raises(ReadError, match="not connected"):
            await gone.read()
        await gone.connect()  # reopened on the next connect
        assert gateway.connects == 2
        await gone.close()
        await also_gone.close()


async def test_a_device_alone_on_its_connection_reconnects_after_a_timeout() -> None:
    async with tcp_gateway([9], silent=[9]) as (gateway, link):
        driver = ModbusDriver(unit_device("solo", 9, link, timeout=0.2), Path("."))
        await driver.connect()
        with pytest.raises(ReadError, match="no answer from unit 9"):
            await driver.read()
        await wait_for(lambda: gateway.disconnects == 1, what="the connection closed")
        await driver.close()


# --------------------------------------------------------------------------- RTU over a real serial line


async def test_rtu_over_a_pty_pair_reads_and_writes_two_units_on_one_port(tmp_path: Path) -> None:
    flow = ModbusPoint(name="m1.flow", address=20, type="float32", writable=True, min=-1e3, max=1e3,
                       word_order="little")
    run = ModbusPoint(name="m1.run", address=3, type="bool", register="coil", writable=True, min=0.0, max=1.0)
    async with rtu_line([1, 2], tmp_path) as (gateway, link):
        m1 = ModbusDriver(unit_device("m1", 1, link, [flow, run]), Path("."))
        m2 = ModbusDriver(unit_device("m2", 2, link), Path("."))
        async with m1, m2:
            await m1.write("m1.flow", -3.5)
            await m1.write("m1.run", True)
            values = {r.point: (r.value, r.quality) for r in [*await m1.read(), *await m2.read()]}
        assert gateway.server is not None
        assert await gateway.server.async_getValues(1, 3, 20, 2) == encode(flow, -3.5)
    assert values == {"m1.flow": (-3.5, GOOD), "m1.run": (True, GOOD), "m2.r0": (200, GOOD)}
    assert {(u, fc) for _, u, fc in gateway.requests} == {(1, 16), (1, 5), (1, 3), (1, 1), (2, 3)}
