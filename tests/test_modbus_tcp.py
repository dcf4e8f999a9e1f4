"""The lean Modbus TCP client against devices that misbehave on the wire.

A scripted TCP server (plain asyncio, no Modbus library) answers each request with exactly the
bytes a test chooses: answers split across packets, late answers to requests that timed out,
exception responses, the wrong function code or byte count, frames that are not Modbus TCP. The
client must keep the good data, fail only what is wrong, and never hang. The happy paths run
against real pymodbus servers in test_modbus_driver.py and test_modbus_links.py.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from drivers.base import BAD, GOOD
from drivers.modbus import ModbusDriver
from drivers.modbus_tcp import NoAnswer, TcpClient
from edge_agent.config import ModbusDevice, ModbusPoint
from edge_agent.errors import ReadError, WriteError

Reply = Callable[[int, int, bytes], list[bytes]]  # (transaction id, unit, request PDU) -> chunks to send


def frame(tid: int, unit: int, pdu: bytes, protocol: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">HHHB", tid, protocol, len(pdu) + 1 if length is None else length, unit) + pdu


def registers_answer(values: list[int]) -> bytes:
    return struct.pack(f">BB{len(values)}H", 3, 2 * len(values), *values)


class Scripted:
    """A TCP server answering each Modbus TCP request with what ``reply`` returns."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[tuple[int, int, bytes]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                header = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                self.requests.append((tid, unit, pdu))
                for chunk in self.reply(tid, unit, pdu):
                    writer.write(chunk)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # separate packets
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(reply: Reply) -> AsyncIterator[Scripted]:
    server = Scripted(reply)
    server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        await server.server.wait_closed()


def device(port: int, count: int = 4, **extra: object) -> ModbusDevice:
    points = [ModbusPoint(name=f"d.r{i}", address=i, type="uint16", writable=bool(extra.get("writable")),
                          min=0 if extra.get("writable") else None, max=1000 if extra.get("writable") else None)
              for i in range(count)]
    return ModbusDevice(name="d", protocol="modbus", host="127.0.0.1", port=port, unit_id=7, timeout=0.3,
                        points=points)


async def test_answers_split_across_packets_and_late_answers_of_timed_out_requests() -> None:
    calls = {"n": 0}

    def reply(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        calls["n"] += 1
        if calls["n"] == 1:
            return []  # never answered: the request times out
        if calls["n"] == 2:  # first the late answer to request 1 (wrong transaction id), then the real one, in pieces
            late = frame(tid - 1, unit, registers_answer([9, 9, 9, 9]))
            good = frame(tid, unit, registers_answer([1, 2, 3, 4]))
            return [late + good[:5], good[5:9], good[9:]]
        return [frame(tid, unit, registers_answer([5, 6, 7, 8]))]

    async with scripted(reply) as server:
        driver = ModbusDriver(device(server.port), Path("."))
        await driver.connect()
        try:
            with pytest.raises(ReadError, match="no answer from unit 7"):
                await driver.read()
            await driver.connect()  # alone on its connection: a timeout closes it (see modbus_link)
            assert [(r.value, r.quality) for r in await driver.read()] == [(1, GOOD), (2, GOOD), (3, GOOD), (4, GOOD)]
            assert [r.value for r in await driver.read()] == [5, 6, 7, 8]
        finally:
            await driver.close()
    assert {unit for _, unit, _ in server.requests} == {7}
    assert server.requests[0][2] == struct.pack(">BHH", 3, 0, 4)


@pytest.mark.parametrize(("answer", "reason"), [
    (bytes([0x83, 2]), "exception code 2"),
    (bytes([4, 8]) + bytes(8), "answer with function code 4"),
    (bytes([3, 6]) + bytes(6), "expected 8 data bytes, got 6"),
    (bytes([3, 8]) + bytes(6), "expected 8 data bytes, got 8 (frame of 6)"),
])
async def test_a_wrong_answer_fails_its_points_only_and_the_connection_stays(answer: bytes, reason: str,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    def reply(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        calls["n"] += 1
        return [frame(tid, unit, answer if calls["n"] == 1 else registers_answer([1, 2, 3, 4]))]

    async with scripted(reply) as server:
        driver = ModbusDriver(device(server.port), Path("."))
        await driver.connect()
        try:
            assert {(r.value, r.quality) for r in await driver.read()} == {(None, BAD)}
            assert reason in caplog.text
            assert [(r.value, r.quality) for r in await driver.read()] == [(1, GOOD), (2, GOOD), (3, GOOD), (4, GOOD)]
        finally:
            await driver.close()
    assert server.connections == 1


@pytest.mark.parametrize("broken", [
    lambda tid, unit: frame(tid, unit, registers_answer([1, 2, 3, 4]), protocol=1),
    lambda tid, unit: frame(tid, unit, b"\x03", length=60000),
    lambda tid, unit: frame(tid, unit, b"", length=1),
])
async def test_a_stream_that_is_not_modbus_tcp_closes_the_connection_and_the_next_one_works(
        broken: Callable[[int, int], bytes]) -> None:
    calls = {"n": 0}

    def reply(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        calls["n"] += 1
        if calls["n"] == 1:
            return [broken(tid, unit) + bytes(300)]
        return [frame(tid, unit, registers_answer([1, 2, 3, 4]))]

    async with scripted(reply) as server:
        driver = ModbusDriver(device(server.port), Path("."))
        await driver.connect()
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(ReadError, match="not a Modbus TCP frame"):
                await driver.read()
            assert loop.time() - began < 0.25  # failed at once, not after the timeout
            await driver.connect()
            assert [r.value for r in await driver.read()] == [1, 2, 3, 4]
        finally:
            await driver.close()
    assert server.connections == 2


async def test_a_write_answer_is_checked_and_a_device_that_hangs_up_fails_the_request_at_once() -> None:
    calls = {"n": 0}

    def reply(tid: int, unit: int, pdu: bytes) -> list[bytes]:
        calls["n"] += 1
        if calls["n"] == 1:
            return [frame(tid, unit, pdu)]  # FC6: the request echoed
        if calls["n"] == 2:
            return [frame(tid, unit, pdu[:3])]  # a short echo
        raise ConnectionError("hang up")

    async with scripted(reply) as server:
        driver = ModbusDriver(device(server.port, writable=True), Path("."))
        await driver.connect()
        try:
            await driver.write("d.r2", 500)
            assert server.requests[-1][2] == struct.pack(">BHH", 6, 2, 500)
            with pytest.raises(WriteError, match="write answer of 3 bytes, expected 5"):
                await driver.write("d.r2", 501)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(WriteError, match="connection"):
                await driver.write("d.r2", 502)
            assert loop.time() - began < 0.25
        finally:
            await driver.close()


async def test_the_client_alone_times_out_and_refuses_when_not_connected() -> None:
    async with scripted(lambda tid, unit, pdu: []) as server:
        port = server.port
        client = TcpClient("127.0.0.1", port, 0.2)
        with pytest.raises(ConnectionError):
            await client.read_holding_registers(0, count=1, device_id=1)
        assert await client.connect() and client.connected
        with pytest.raises(NoAnswer):
            await client.read_holding_registers(0, count=1, device_id=1)
        client.close()
        assert not client.connected
    refused = TcpClient("127.0.0.1", port, 0.2)  # the server is gone
    with pytest.raises(OSError):
        await refused.connect()


class Gathering(asyncio.Protocol):
    """A server that waits until ``expect`` requests are on the wire, then answers them in reverse
    order in one write (answer ``busy`` numbers of them with "server busy"): only a client that sends
    a read's requests together is ever answered."""

    def __init__(self, expect: int, busy: frozenset[int] = frozenset()) -> None:
        self.expect = expect
        self.busy = busy  # indexes (0-based, in request order) answered with exception code 6
        self.buffer = b""
        self.pending: list[tuple[int, int, bytes]] = []
        self.received: list[bytes] = []  # request PDUs, in arrival order
        self.transport: asyncio.Transport | None = None
        self.busy_then_one_by_one = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 7:
            tid, _, length, unit = struct.unpack(">HHHB", self.buffer[:7])
            if len(self.buffer) < 6 + length:
                return
            pdu, self.buffer = self.buffer[7:6 + length], self.buffer[6 + length:]
            self.received.append(pdu)
            self.pending.append((tid, unit, pdu))
        if len(self.pending) >= self.expect:
            out = []
            if self.busy_then_one_by_one:
                self.expect = 1  # after these answers, each request is answered as it comes
            for index, (tid, unit, pdu) in reversed(list(enumerate(self.pending))):
                _, address, count = struct.unpack(">BHH", pdu)
                body = bytes([0x83, 6]) if index in self.busy else registers_answer(
                    [address + i for i in range(count)])
                out.append(frame(tid, unit, body))
            self.pending.clear()
            assert self.transport is not None
            self.transport.write(b"".join(out))


@asynccontextmanager
async def gathered(server: Gathering, in_flight: int) -> AsyncIterator[ModbusDriver]:
    """A driver connected to ``server`` for six registers read two at a time: three blocks, 0..1,
    2..3, 4..5, sent ``in_flight`` at a time."""
    listener = await asyncio.get_running_loop().create_server(lambda: server, "127.0.0.1", 0)
    points = [ModbusPoint(name=f"d.r{i}", address=i, type="uint16") for i in range(6)]
    device = ModbusDevice(name="d", protocol="modbus", host="127.0.0.1", port=listener.sockets[0].getsockname()[1],
                          unit_id=7, timeout=0.5, max_registers=2, requests_in_flight=in_flight, points=tuple(points))
    driver = ModbusDriver(device, Path("."))
    await driver.connect()
    try:
        yield driver
    finally:
        await driver.close()
        listener.close()
        await listener.wait_closed()


async def test_a_reads_requests_in_flight_go_together_and_their_answers_come_in_any_order() -> None:
    server = Gathering(expect=3)
    async with gathered(server, in_flight=4) as driver:
        for _ in range(3):
            readings = await driver.read()
            assert [(r.point, r.value, r.quality) for r in readings] == [(f"d.r{i}", i, GOOD) for i in range(6)]
            assert len({r.ts for r in readings}) == 1
    assert server.received[:3] == [struct.pack(">BHH", 3, a, 2) for a in (0, 2, 4)]
    assert len(server.received) == 9


async def test_groups_are_requests_in_flight_long() -> None:
    server = Gathering(expect=2)  # answers once two requests are there: the third goes alone and waits...
    async with gathered(server, in_flight=2) as driver:
        with pytest.raises(ReadError, match="no answer"):  # ...for a second request that never comes
            await driver.read()
    assert server.received == [struct.pack(">BHH", 3, a, 2) for a in (0, 2, 4)]


async def test_a_server_busy_with_requests_in_flight_gets_them_again_one_at_a_time(
        caplog: pytest.LogCaptureFixture) -> None:
    answered_busy = Gathering(expect=3, busy=frozenset({1}))
    answered_busy.busy_then_one_by_one = True
    async with gathered(answered_busy, in_flight=3) as driver:
        assert [(r.value, r.quality) for r in await driver.read()] == [(i, GOOD) for i in range(6)]
        assert "server busy" in caplog.text and "one request at a time" in caplog.text
        assert [r.value for r in await driver.read()] == [0, 1, 2, 3, 4, 5]
    assert len(answered_busy.received) == 3 + 1 + 3  # together, the busy one again, then one at a time
