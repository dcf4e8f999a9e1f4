"""The Modbus driver against real pymodbus servers (TCP, and RTU framing over a socket URL).

The server is pymodbus's own, started in-process on a free loopback port; its ``trace_pdu`` hook
records every request it receives, so coalescing is asserted on the wire.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers import driver_class
from drivers.base import BAD, GOOD, DeviceRead, Reading
from drivers.modbus import ModbusDriver
from drivers.modbus_codec import INTEGER_RANGES, MAX_BITS, build_plan, encode, exact, resolution
from edge_agent.config import TYPES, ModbusDevice, ModbusPoint
from edge_agent.errors import ConnectError, ReadError, WriteError
from tests.helpers import free_port, wait_for

UNIT = 1
READ_CODES = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
WRITE_CODES = (5, 6, 15, 16)
TABLE_CODE = {"coil": 5, "discrete": 2, "holding": 16, "input": 4}  # fc that sets/gets a table on the server


class Plant:
    """A real pymodbus server: holding 0..399 and 600..999 (400..599 undefined), input 0..999,
    coils and discrete inputs 0..2047. ``requests`` holds (function code, address, count) of
    every request that arrived on the wire, reads and writes alike (seen through trace_pdu)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[tuple[int, int, int]] = []
        self.server: ModbusTcpServer | ModbusSerialServer | None = None

    def device(self) -> SimDevice:
        registers = DataType.REGISTERS
        return SimDevice(
            id=UNIT,
            simdata=(
                [SimData(0, values=[False] * 2048, datatype=DataType.BITS)],
                [SimData(0, values=[False] * 2048, datatype=DataType.BITS)],
                [SimData(0, count=400, datatype=registers), SimData(600, count=400, datatype=registers)],
                [SimData(0, count=1000, datatype=registers)],
            ),
        )

    def _record(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:  # a request arriving on the wire
            self.requests.append((pdu.function_code, pdu.address, pdu.count))
        return pdu

    def reads(self) -> list[tuple[str, int, int]]:
        """Read requests seen so far as (table, address, count)."""
        return [(READ_CODES[fc], a, c) for fc, a, c in self.requests if fc in READ_CODES]

    def writes(self) -> list[tuple[int, int, int]]:
        return [r for r in self.requests if r[0] in WRITE_CODES]

    async def set(self, table: str, address: int, values: Sequence[int] | Sequence[bool]) -> None:
        assert self.server is not None
        await self.server.async_setValues(UNIT, TABLE_CODE[table], address, list(values))

    async def get(self, table: str, address: int, count: int) -> list[int] | list[bool]:
        assert self.server is not None
        code = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}[table]
        values = await self.server.async_getValues(UNIT, code, address, count)
        return values

    async def start_tcp(self) -> None:
        self.server = ModbusTcpServer(self.device(), address=("127.0.0.1", self.port), trace_pdu=self._record)
        await self.server.serve_forever(background=True)

    async def start_rtu(self) -> None:
        self.server = ModbusSerialServer(self.device(), port=f"socket://127.0.0.1:{self.port}",
                                         trace_pdu=self._record)
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None


@asynccontextmanager
async def plant(rtu: bool = False) -> AsyncIterator[Plant]:
    """A running server on a free port, stopped on exit."""
    running = Plant(free_port())
    await (running.start_rtu() if rtu else running.start_tcp())
    try:
        yield running
    finally:
        await running.stop()


def point(name: str, address: int, type: str = "uint16", **kw: Any) -> ModbusPoint:
    """A writable point; register defaults to holding (coil for bool)."""
    register = kw.pop("register", "coil" if type == "bool" else "holding")
    return ModbusPoint(name=name, address=address, type=type, register=register, writable=True, **kw)


def device(port: int, points: Sequence[ModbusPoint], **kw: Any) -> ModbusDevice:
    kw.setdefault("host", "127.0.0.1")
    return ModbusDevice(name="pump1", protocol=kw.pop("protocol", "modbus"), port=port, timeout=1.0,
                        unit_id=UNIT, points=tuple(points), **kw)


@asynccontextmanager
async def connected(dev: ModbusDevice) -> AsyncIterator[ModbusDriver]:
    driver = ModbusDriver(dev, Path("."))
    async with driver:
        yield driver


def by_name(readings: list[Reading]) -> dict[str, Reading]:
    return {r.point: r for r in readings}


# (type, word order, value, registers on the wire)
KNOWN = [
    ("int16", "big", -2, [0xFFFE]),
    ("int16", "little", -32768, [0x8000]),
    ("uint16", "big", 65535, [0xFFFF]),
    ("int32", "big", -2, [0xFFFF, 0xFFFE]),
    ("int32", "little", -2, [0xFFFE, 0xFFFF]),
    ("uint32", "big", 0x12345678, [0x1234, 0x5678]),
    ("uint32", "little", 0x12345678, [0x5678, 0x1234]),
    ("int64", "big", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("int64", "little", 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
    ("uint64", "big", 0x8000000000000001, [0x8000, 0x0000, 0x0000, 0x0001]),
    ("uint64", "little", 0x8000000000000001, [0x0001, 0x0000, 0x0000, 0x8000]),
    ("uint64", "big", 2**64 - 1, [0xFFFF] * 4),
    ("float32", "big", 1.5, [0x3FC0, 0x0000]),
    ("float32", "little", 1.5, [0x0000, 0x3FC0]),
    ("float32", "big", -2.0, [0xC000, 0x0000]),
    ("float64", "big", 1.5, [0x3FF8, 0x0000, 0x0000, 0x0000]),
    ("float64", "little", -0.1, [0x999A, 0x9999, 0x9999, 0xBFB9]),
]
KNOWN_IDS = [f"{t}-{o}-{v}" for t, o, v, _ in KNOWN]


# --------------------------------------------------------------------------- the plan


def test_plan_coalesces_neighbours_and_separates_tables() -> None:
    points = [point(f"f{i}", 2 * i, "float32") for i in range(10)]
    points += [point("in", 0, register="input"), point("c0", 0, "bool"), point("c1", 1, "bool"),
               point("d", 3, "bool", register="discrete")]
    blocks = build_plan(points)
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("holding", 0, 20), ("input", 0, 1), ("coil", 0, 2), ("discrete", 3, 1)]
    assert len(blocks[0].runs) == 1  # ten float32 unpacked by one struct call


def test_plan_splits_at_max_registers() -> None:
    blocks = build_plan([point(f"r{i}", i) for i in range(251)])
    assert [(b.address, b.count) for b in blocks] == [(0, 125), (125, 125), (250, 1)]
    floats = build_plan([point(f"f{i}", 2 * i, "float32") for i in range(100)], max_registers=125)
    assert [(b.address, b.count) for b in floats] == [(0, 124), (124, 76)]  # a float never straddles
    assert [(b.address, b.count) for b in build_plan([point(f"r{i}", i) for i in range(10)], 4)] == [
        (0, 4), (4, 4), (8, 2)]


def test_plan_bridges_gaps_up_to_max_gap_only() -> None:
    points = [point("a", 0), point("b", 6), point("c", 20)]
    assert [(b.address, b.count) for b in build_plan(points, max_gap=5)] == [(0, 7), (20, 1)]
    assert [(b.address, b.count) for b in build_plan(points, max_gap=4)] == [(0, 1), (6, 1), (20, 1)]
    assert [(b.address, b.count) for b in build_plan(points, max_gap=13)] == [(0, 21)]


def test_plan_splits_bits_at_2000() -> None:
    blocks = build_plan([point(f"c{i}", i, "bool") for i in range(MAX_BITS + 1)])
    assert [(b.address, b.count) for b in blocks] == [(0, MAX_BITS), (MAX_BITS, 1)]


def decode_one(p: ModbusPoint, registers: list[int]) -> object:
    [block] = build_plan([p])
    return block.decode(registers)[0]


@given(st.sampled_from(sorted(INTEGER_RANGES)), st.sampled_from(["big", "little"]), st.data())
def test_integer_encode_decode_round_trip(kind: str, order: str, data: st.DataObject) -> None:
    low, high = INTEGER_RANGES[kind]
    value = data.draw(st.integers(low, high))
    p = point("p", 0, kind, word_order=order)
    assert decode_one(p, encode(p, value)) == value  # type: ignore[arg-type]


@given(st.sampled_from(["big", "little"]), st.floats(allow_nan=False, allow_infinity=False),
       st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float_encode_decode_round_trip(order: str, double: float, single: float) -> None:
    p64, p32 = point("d", 0, "float64", word_order=order), point("s", 0, "float32", word_order=order)
    assert decode_one(p64, encode(p64, double)) == double  # type: ignore[arg-type]
    assert decode_one(p32, encode(p32, single)) == single  # type: ignore[arg-type]


@given(st.sampled_from([*sorted(INTEGER_RANGES), "float32", "float64"]), st.sampled_from(["big", "little"]),
       st.sampled_from([1.0, 10.0, 0.1, -2.5]), st.sampled_from([0.0, -40.0, 3.25]),
       st.floats(-30_000, 30_000, allow_nan=False))
def test_exact_is_what_a_write_leaves_and_writing_it_changes_nothing(kind: str, order: str, scale: float,
                                                                      offset: float, value: float) -> None:
    """exact() = decode(encode()): the value the gate checks is the value a read returns after the write,
    within half a raw step of the request, and writing it sends the very same registers."""
    p = point("p", 0, kind, word_order=order, scale=scale, offset=offset)
    try:
        registers = encode(p, value)
    except ValueError:  # out of the type's range (unsigned types, scaled)
        return
    held = exact(p, value)
    assert held == decode_one(p, registers)  # type: ignore[arg-type]
    assert exact(p, held) == held
    if held != 0:  # -0.0 scaled and offset comes back +0.0: the same zero, another bit pattern
        assert encode(p, held) == registers
    assert abs(float(held) - value) <= resolution(p, value) / 2 * (1 + 1e-9) + 1e-9


def test_exact_rounds_like_the_register_and_is_strict_about_kinds() -> None:
    level = point("level", 0, "int16", scale=10.0)
    assert (exact(level, 214), exact(level, 216), resolution(level, 214)) == (210.0, 220.0, 10.0)
    assert exact(point("raw", 0, "uint16"), 1450) == 1450 and isinstance(exact(point("raw", 0, "uint16"), 1450), int)
    ratio = point("ratio", 0, "float32")
    assert exact(ratio, 0.1) == float(np.float32(0.1)) and exact(ratio, 0.1) != 0.1
    assert exact(point("run", 0, "bool"), True) is True
    for p, value, message in ((point("run", 0, "bool"), 1, 'expected true or false for bool point "run", got 1'),
                              (level, True, 'expected a number for int16 point "level", got True'),
                              (level, "7", "expected a number for int16 point \"level\", got '7'"),
                              (level, 400_000, "400000 is out of range for int16 point \"level\"")):
        with pytest.raises(ValueError) as info:
            exact(p, value)
        assert str(info.value).startswith(message), info.value


def test_mixed_block_decodes_each_point_like_alone() -> None:
    points = [point("a", 0, "int16"), point("b", 1, "float32", word_order="little"),
              point("c", 3, "float32", word_order="little", scale=2.0), point("d", 5, "uint64"),
              point("e", 10, "int32", word_order="little", offset=1.0), point("f", 12, "float64")]
    values = {"a": -7, "b": 0.25, "c": 3.0, "d": 2**40 + 3, "e": -99.0, "f": 1e100}
    registers = [0] * 16
    for p in points:
        registers[p.address:p.address + p.width] = encode(p, values[p.name])  # type: ignore[assignment]
    [block] = build_plan(points, max_gap=3)
    assert dict(zip(block.names, block.decode(registers), strict=True)) == values
    assert [r.byte_offset for r in block.runs] == [0, 2, 6, 10, 20, 24]


def test_registry_knows_both_protocols() -> None:
    assert driver_class("modbus") is ModbusDriver
    assert driver_class("modbus-rtu") is ModbusDriver


# --------------------------------------------------------------------------- reads


@pytest.mark.parametrize(("kind", "order", "value", "registers"), KNOWN, ids=KNOWN_IDS)
async def test_read_decodes_known_registers(kind: str, order: str, value: float,
                                            registers: list[int]) -> None:
    async with plant() as server:
        await server.set("holding", 10, registers)
        async with connected(device(server.port, [point("p", 10, kind, word_order=order)])) as driver:
            [reading] = await driver.read()
    assert reading.point == "p"
    assert reading.quality == GOOD
    assert reading.value == value
    assert type(reading.value) is (float if kind.startswith("float") else int)


async def test_read_applies_scale_and_offset() -> None:
    points = [
        point("temp", 0, "int16", scale=0.1, offset=-5.0),
        point("flow", 1, "float32", word_order="little", scale=2.0, offset=1.0),
        point("count", 3, "uint32", scale=1.0, offset=0.0),
        point("shifted", 5, "uint16", offset=100.0),
    ]
    async with plant() as server:
        await server.set("holding", 0, [0xFF38, 0x0000, 0x3FC0, 0x0001, 0x0000, 7])  # -200, 1.5, 65536, 7
        async with connected(device(server.port, points)) as driver:
            values = {r.point: r.value for r in await driver.read()}
    assert values["temp"] == pytest.approx(-25.0)
    assert values["flow"] == 4.0
    assert values["count"] == 65536 and type(values["count"]) is int
    assert values["shifted"] == 107.0 and type(values["shifted"]) is float


async def test_read_every_table() -> None:
    points = [
        point("hr", 0, "uint16"),
        point("ir", 2, "float32", register="input"),
        point("coil0", 0, "bool"), point("coil17", 17, "bool"),
        point("di5", 5, "bool", register="discrete"), point("di6", 6, "bool", register="discrete"),
    ]
    async with plant() as server:
        await server.set("holding", 0, [42])
        await server.set("input", 2, [0x3FC0, 0x0000])
        await server.set("coil", 17, [True])
        await server.set("discrete", 5, [True])
        async with connected(device(server.port, points)) as driver:
            readings = by_name(await driver.read())
    assert {n: r.value for n, r in readings.items()} == {
        "hr": 42, "ir": 1.5, "coil0": False, "coil17": True, "di5": True, "di6": False}
    assert {r.quality for r in readings.values()} == {GOOD}
    assert len({r.ts for r in readings.values()}) == 1  # one timestamp per read


async def test_a_server_that_drops_requests_in_flight_is_read_one_at_a_time(caplog: pytest.LogCaptureFixture) -> None:
    """pymodbus's server (3.16) answers only the last request of those that arrive together: the
    read gets the others again one at a time, with a warning, and later reads go one at a time."""
    points = [point("hr", 0, "uint16"), point("ir", 2, "float32", register="input"), point("coil17", 17, "bool"),
              point("di5", 5, "bool", register="discrete")]
    async with plant() as server:
        await server.set("holding", 0, [42])
        await server.set("input", 2, [0x3FC0, 0x0000])
        await server.set("coil", 17, [True])
        await server.set("discrete", 5, [True])
        # two groups of two: the first finds out (one timeout), the second goes one at a time at once
        async with connected(device(server.port, points, requests_in_flight=2)) as driver:
            began = asyncio.get_running_loop().time()
            first = by_name(await driver.read())
            took = asyncio.get_running_loop().time() - began
            assert "requests sent together" in caplog.text and "one request at a time" in caplog.text
            seen = len(server.reads())
            second = by_name(await driver.read())
    assert 1.0 <= took < 1.8  # one timeout (1 s), not one per group
    for readings in (first, second):
        assert {n: (r.value, r.quality) for n, r in readings.items()} == {
            "hr": (42, GOOD), "ir": (1.5, GOOD), "coil17": (True, GOOD), "di5": (True, GOOD)}
    assert len(server.reads()) - seen == 4  # one request per block


async def test_neighbouring_points_share_one_request_per_table() -> None:
    points = [point(f"f{i}", 2 * i, "float32", word_order="little" if i % 2 else "big") for i in range(20)]
    points += [point(f"i{i}", i, "int16", register="input") for i in range(5)]
    points += [point(f"c{i}", i, "bool") for i in range(0, 30, 3)]
    async with plant() as server:
        await server.set("holding", 0, [0x3FC0, 0x0000, 0x0000, 0x3FC0] * 10)
        async with connected(device(server.port, points, max_gap=2)) as driver:
            server.requests.clear()
            readings = await driver.read()
        assert server.reads() == [("holding", 0, 40), ("input", 0, 5), ("coil", 0, 28)]
    assert [r.value for r in readings[:20]] == [1.5] * 20
    assert len(readings) == len(points)


async def test_max_registers_and_gaps_split_requests_on_the_wire() -> None:
    points = [point(f"r{i}", i) for i in range(130)] + [point("far", 300), point("next", 307)]
    async with plant() as server:
        await server.set("holding", 0, list(range(130)))
        async with connected(device(server.port, points, max_gap=5)) as driver:
            server.requests.clear()
            values = {r.point: r.value for r in await driver.read()}
        assert server.reads() == [("holding", 0, 125), ("holding", 125, 5), ("holding", 300, 1),
                                  ("holding", 307, 1)]  # a gap of 6 > max_gap
    assert [values[f"r{i}"] for i in range(130)] == list(range(130))


async def test_exception_response_marks_only_that_block_bad() -> None:
    points = [point("ok", 0, "uint16"), point("missing", 500, "float32"), point("after", 600, "int16")]
    async with plant() as server:
        await server.set("holding", 0, [7])
        await server.set("holding", 600, [0xFFFF])
        async with connected(device(server.port, points)) as driver:
            first = by_name(await driver.read())
            second = by_name(await driver.read())  # still connected, still answering
    assert (first["ok"].value, first["ok"].quality) == (7, GOOD)
    assert (first["missing"].value, first["missing"].quality) == (None, BAD)
    assert (first["after"].value, first["after"].quality) == (-1, GOOD)
    assert (second["missing"].quality, second["after"].value) == (BAD, -1)


async def test_a_good_read_carries_its_columns_and_a_bad_one_does_not() -> None:
    """Every block good: a DeviceRead whose columns are its readings (what the twin and the v2
    telemetry use); one block bad, or a float that is not a number: a plain list of readings."""
    points = [point("a", 0, "uint16"), point("b", 1, "float32"), point("c", 600, "int16"),
              point("d", 700, "float32")]
    async with plant() as server:
        await server.set("holding", 0, [7, 0x3FC0, 0x0000])  # 7, 1.5
        await server.set("holding", 600, [0xFFFF])
        await server.set("holding", 700, [0x4120, 0x0000])  # 10.0
        async with connected(device(server.port, points)) as driver:
            good = await driver.read()
            await server.set("holding", 700, [0x7FC0, 0x0000])  # NaN
            nan = await driver.read()
            await server.set("holding", 700, [0x4120, 0x0000])
            again = await driver.read()
    assert isinstance(good, DeviceRead)
    assert list(good) == [Reading(n, v, GOOD, good.ts) for n, v in zip("abcd", (7, 1.5, -1, 10.0), strict=True)]
    assert (good.names, good.values, good.quality) == (tuple("abcd"), (7, 1.5, -1, 10.0), GOOD)
    assert not isinstance(nan, DeviceRead)
    assert [(r.value, r.quality) for r in nan][2:] == [(-1, GOOD), (nan[3].value, BAD)] and math.isnan(nan[3].value)
    assert isinstance(again, DeviceRead) and again.values == (7, 1.5, -1, 10.0)


async def test_server_gone_read_raises_and_connect_fails() -> None:
    async with plant() as server:
        port = server.port
        driver = ModbusDriver(device(port, [point("a", 0)]), Path("."))
        await driver.connect()
        assert [r.quality for r in await driver.read()] == [GOOD]
        await server.stop()
        with pytest.raises(ReadError, match='device "pump1"'):
            await driver.read()
        with pytest.raises(ReadError, match="not connected"):
            await driver.read()
        with pytest.raises(ConnectError, match=f'device "pump1": cannot connect to 127.0.0.1:{port}'):
            await driver.connect()
        await driver.close()
        await driver.close()  # twice: still no error


async def test_reconnects_after_server_returns() -> None:
    async with plant() as server:
        port = server.port
        driver = ModbusDriver(device(port, [point("a", 0)]), Path("."))
        await driver.connect()
        await server.stop()
        await server.start_tcp()
        await server.set("holding", 0, [5])

        async def value_after_reconnect() -> object:
            try:
                await driver.connect()
                return (await driver.read())[0].value
            except (ConnectError, ReadError):
                return None

        assert await wait_for(value_after_reconnect, timeout=5.0, what="read after restart") == 5
        await driver.close()


async def test_close_without_connect_never_raises() -> None:
    driver = ModbusDriver(device(1, [point("a", 0)]), Path("."))
    await driver.close()
    with pytest.raises(ReadError, match="not connected"):
        await driver.read()
    with pytest.raises(WriteError, match="not connected"):
        await driver.write("a", 1)


# --------------------------------------------------------------------------- writes


@pytest.mark.parametrize(("kind", "order", "value", "registers"), KNOWN, ids=KNOWN_IDS)
async def test_write_round_trips(kind: str, order: str, value: float, registers: list[int]) -> None:
    async with plant() as server:
        async with connected(device(server.port, [point("p", 10, kind, word_order=order)])) as driver:
            await driver.write("p", value)
            [reading] = await driver.read()
        assert await server.get("holding", 10, len(registers)) == registers
        assert [fc for fc, _, _ in server.writes()] == [6 if len(registers) == 1 else 16]
    assert reading.value == value


@pytest.mark.parametrize("kind", [t for t in TYPES if t != "bool"])
@pytest.mark.parametrize("order", ["big", "little"])
async def test_scaled_write_round_trips(kind: str, order: str) -> None:
    p = point("sp", 20, kind, word_order=order, scale=0.5, offset=10.0)
    async with plant() as server:
        async with connected(device(server.port, [p])) as driver:
            await driver.write("sp", 31.5)  # raw 43
            [reading] = await driver.read()
        assert await server.get("holding", 20, p.width) == encode(p, 31.5)
    assert reading.value == 31.5
    assert encode(p, 31.5) == encode(point("raw", 0, kind, word_order=order), 43)


async def test_float32_little_word_order_write_lands_as_read() -> None:
    p = point("setpoint", 100, "float32", word_order="little")
    async with plant() as server, connected(device(server.port, [p])) as driver:
        await driver.write("setpoint", 7.25)  # 0x40E80000
        assert await server.get("holding", 100, 2) == [0x0000, 0x40E8]
        assert (await driver.read())[0].value == 7.25


async def test_write_coil() -> None:
    async with plant() as server:
        async with connected(device(server.port, [point("run", 33, "bool")])) as driver:
            await driver.write("run", True)
            assert (await driver.read())[0].value is True
            assert await server.get("coil", 33, 1) == [True]
            await driver.write("run", 0)
            assert (await driver.read())[0].value is False
        assert [fc for fc, _, _ in server.writes()] == [5, 5]


@pytest.mark.parametrize(("kind", "value"), [
    ("int16", 32768), ("int16", -32769), ("uint16", -1), ("uint16", 65536), ("int32", 2**31),
    ("uint32", -1), ("int64", 2**63), ("uint64", 2**64), ("float32", 1e39), ("float32", math.nan),
    ("float64", math.inf), ("uint16", "12"), ("uint16", True),
])
async def test_out_of_range_or_bad_value_is_refused(kind: str, value: object) -> None:
    async with plant() as server:
        await server.set("holding", 0, [1, 2, 3, 4])
        server.requests.clear()
        async with connected(device(server.port, [point("p", 0, kind)])) as driver:
            with pytest.raises(WriteError, match='device "pump1"'):
                await driver.write("p", value)
        assert server.writes() == []
        assert await server.get("holding", 0, 4) == [1, 2, 3, 4]


async def test_scaled_value_out_of_range_is_refused() -> None:
    p = point("p", 0, "uint16", scale=0.01)
    async with plant() as server, connected(device(server.port, [p])) as driver:
        await driver.write("p", 655.35)
        with pytest.raises(WriteError, match="out of range"):
            await driver.write("p", 655.36)
        assert (await driver.read())[0].value == pytest.approx(655.35)


async def test_write_refusals() -> None:
    points = [point("ir", 0, register="input"), point("di", 0, "bool", register="discrete"),
              ModbusPoint(name="ro", address=1, type="uint16"), point("hole", 450)]
    async with plant() as server, connected(device(server.port, points)) as driver:
        with pytest.raises(WriteError, match="read-only input"):
            await driver.write("ir", 1)
        with pytest.raises(WriteError, match="read-only discrete"):
            await driver.write("di", True)
        with pytest.raises(WriteError, match="not writable"):
            await driver.write("ro", 1)
        with pytest.raises(WriteError, match='point "nope": no such point'):
            await driver.write("nope", 1)
        with pytest.raises(WriteError, match="exception code 2"):
            await driver.write("hole", 1)  # the device answers illegal address
        assert (await driver.read())[0].quality == GOOD  # connection still usable


# --------------------------------------------------------------------------- RTU


async def test_rtu_round_trip_over_socket_url() -> None:
    """RTU framing end to end; pyserial's socket:// URL stands in for a serial line."""
    points = [point("flow", 0, "float32", word_order="little"), point("run", 3, "bool")]
    async with plant(rtu=True) as server:
        dev = device(0, points, protocol="modbus-rtu", host="", serial_port=f"socket://127.0.0.1:{server.port}")
        assert driver_class(dev.protocol) is ModbusDriver
        async with connected(dev) as driver:
            await driver.write("flow", -3.5)
            await driver.write("run", True)
            values = {r.point: (r.value, r.quality) for r in await driver.read()}
        assert await server.get("holding", 0, 2) == [0x0000, 0xC060]
    assert values == {"flow": (-3.5, GOOD), "run": (True, GOOD)}


# --------------------------------------------------------------------------- byte order (issue 14)

# (type, word order, byte order, value, registers on the wire): the four layouts devices ship,
# with the value's bytes A B C D (most significant first) as ABCD, CDAB, BADC and DCBA.
KNOWN_BYTES = [
    ("float32", "big", "big", 1.5, [0x3FC0, 0x0000]),  # ABCD
    ("float32", "little", "big", 1.5, [0x0000, 0x3FC0]),  # CDAB
    ("float32", "big", "little", 1.5, [0xC03F, 0x0000]),  # BADC
    ("float32", "little", "little", 1.5, [0x0000, 0xC03F]),  # DCBA
    ("uint32", "big", "big", 0x11223344, [0x1122, 0x3344]),
    ("uint32", "little", "big", 0x11223344, [0x3344, 0x1122]),
    ("uint32", "big", "little", 0x11223344, [0x2211, 0x4433]),
    ("uint32", "little", "little", 0x11223344, [0x4433, 0x2211]),
    ("int32", "big", "little", -2, [0xFFFF, 0xFEFF]),
    ("int64", "big", "little", 0x0102030405060708, [0x0201, 0x0403, 0x0605, 0x0807]),
    ("int64", "little", "little", 0x0102030405060708, [0x0807, 0x0605, 0x0403, 0x0201]),
    ("uint64", "little", "big", 0x0102030405060708, [0x0708, 0x0506, 0x0304, 0x0102]),
    ("float64", "big", "little", 1.5, [0xF83F, 0x0000, 0x0000, 0x0000]),
    ("float64", "little", "little", -0.1, [0x9A99, 0x9999, 0x9999, 0xB9BF]),
    ("int16", "big", "little", 0x0102, [0x0201]),  # a 16-bit value swaps its two bytes too
    ("uint16", "little", "little", 0xFF00, [0x00FF]),  # word order means nothing for one register
]
KNOWN_BYTES_IDS = [f"{t}-w{w}-b{b}" for t, w, b, _, _ in KNOWN_BYTES]


@pytest.mark.parametrize(("kind", "words", "bytes_", "value", "registers"), KNOWN_BYTES, ids=KNOWN_BYTES_IDS)
def test_byte_and_word_order_encode_and_decode_known_layouts(kind: str, words: str, bytes_: str, value: float,
                                                             registers: list[int]) -> None:
    p = point("p", 0, kind, word_order=words, byte_order=bytes_)
    assert encode(p, value) == registers
    assert decode_one(p, registers) == value


@pytest.mark.parametrize(("kind", "words", "bytes_", "value", "registers"), KNOWN_BYTES, ids=KNOWN_BYTES_IDS)
async def test_byte_order_reads_and_writes_on_the_wire(kind: str, words: str, bytes_: str, value: float,
                                                       registers: list[int]) -> None:
    p = point("p", 10, kind, word_order=words, byte_order=bytes_)
    async with plant() as server:
        await server.set("holding", 10, registers)
        async with connected(device(server.port, [p])) as driver:
            [read] = await driver.read()
            await server.set("holding", 10, [0] * len(registers))
            await driver.write("p", value)
            [again] = await driver.read()
        assert await server.get("holding", 10, len(registers)) == registers  # written as the device lays it out
    assert (read.value, read.quality) == (value, GOOD)
    assert (again.value, again.quality) == (value, GOOD)


@given(st.sampled_from([t for t in TYPES if t != "bool"]), st.sampled_from(["big", "little"]),
       st.sampled_from(["big", "little"]), st.data())
def test_every_order_round_trips(kind: str, words: str, bytes_: str, data: st.DataObject) -> None:
    p = point("p", 0, kind, word_order=words, byte_order=bytes_)
    if kind in INTEGER_RANGES:
        value: float = data.draw(st.integers(*INTEGER_RANGES[kind]))
    else:
        value = data.draw(st.floats(width=32 if kind == "float32" else 64, allow_nan=False, allow_infinity=False))
    registers = encode(p, value)
    assert decode_one(p, registers) == value  # type: ignore[arg-type]
    plain = encode(point("q", 0, kind), value)  # the same value big/big: the same bytes, moved
    assert isinstance(registers, list) and isinstance(plain, list)
    swapped = [((r & 0xFF) << 8) | (r >> 8) for r in plain] if bytes_ == "little" else plain
    assert registers == (swapped[::-1] if words == "little" else swapped)


def test_mixed_orders_in_one_block_decode_like_alone() -> None:
    orders = [("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")]
    points = [point(f"f{i}", 2 * i, "float32", word_order=w, byte_order=b) for i, (w, b) in enumerate(orders)]
    points += [point(f"d{i}", 8 + 4 * i, "float64", word_order=w, byte_order=b) for i, (w, b) in enumerate(orders)]
    values = {p.name: float(i) + 0.25 for i, p in enumerate(points)}
    registers = [0] * 24
    for p in points:
        registers[p.address:p.address + p.width] = encode(p, values[p.name])  # type: ignore[assignment]
    [block] = build_plan(points)
    assert dict(zip(block.names, block.decode(registers), strict=True)) == values
    assert block.pack_big is not None and block.pack_little is not None  # both packings, once each


# --------------------------------------------------------------------------- NaN and infinity (issue 14)


async def test_nan_and_infinity_from_a_float_register_read_bad_and_the_rest_good() -> None:
    points = [point("ok", 0, "float32"), point("nan", 2, "float32"), point("inf", 4, "float32", word_order="little"),
              point("ninf64", 6, "float64", byte_order="little"), point("count", 10, "uint16"),
              point("scaled", 11, "uint16", scale=0.5)]
    async with plant() as server:
        await server.set("holding", 0, [0x3FC0, 0x0000, 0x7FC0, 0x0000, 0x0000, 0x7F80,
                                        0xF0FF, 0x0000, 0x0000, 0x0000, 7, 8])
        async with connected(device(server.port, points, max_gap=2)) as driver:
            first = by_name(await driver.read())
            await server.set("holding", 2, [0x4000, 0x0000])  # the sensor is back: 2.0
            second = by_name(await driver.read())
    assert (first["ok"].value, first["ok"].quality) == (1.5, GOOD)
    assert math.isnan(first["nan"].value) and first["nan"].quality == BAD  # type: ignore[arg-type]
    assert (first["inf"].value, first["inf"].quality) == (math.inf, BAD)
    assert (first["ninf64"].value, first["ninf64"].quality) == (-math.inf, BAD)
    assert (first["count"].value, first["count"].quality) == (7, GOOD)
    assert (first["scaled"].value, first["scaled"].quality) == (4.0, GOOD)
    assert (second["nan"].value, second["nan"].quality) == (2.0, GOOD)
    assert second["inf"].quality == BAD
