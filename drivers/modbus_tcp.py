"""A lean Modbus TCP client: MBAP framing on an asyncio protocol.

Why not pymodbus here
    At plant shapes (tens of devices, a hundred points each, read every 100 ms) the fixed cost of
    each request dominates the agent's CPU: pymodbus builds a PDU object per request, formats it
    for its debug log, decodes every register with its own ``struct.unpack`` call and runs a
    transaction manager with its own timers. A read here is one ``bytes`` header, one write to
    the socket, one future, and the answer's register bytes handed to the codec as they came
    (:meth:`drivers.modbus_codec.Block.decode_wire`: one C call per run of points).
    bench/bench_plant.py measures the difference; docs/benchmarks.md has the figures. pymodbus
    still serves Modbus RTU (serial framing, CRC and inter-frame timing are where a library earns
    its place), the commissioning ``probe`` and the test servers.

The protocol (Modbus Messaging on TCP/IP Implementation Guide V1.0b)
    Each frame is an MBAP header (transaction id, protocol id 0, length of what follows, unit
    id) and a PDU (function code and data). Answers are matched by transaction id: an answer
    with another id (a late answer to a request that timed out) is dropped. A frame that cannot
    be Modbus TCP (protocol id not 0, a length outside 2..254) means the stream has lost its
    framing, which cannot be recovered: the connection is closed and the link reconnects. An
    answer with the right id but the wrong function code or byte count is a malformed answer:
    it fails that request only (:class:`Answer` with a ``problem``), like a short answer did.

Requests in flight
    The implementation guide lets a client send several requests without waiting for each answer
    (that is what the transaction id is for), and a server take as many as it can
    (``NumberMaxOfServerTransaction``). :meth:`TcpClient.read_blocks` sends a read's requests in
    one write and takes their answers in any order: one socket write, one wake-up and one timer
    per read instead of per block (measured: about a sixth less agent CPU at 20 devices x 125
    float32 points every 100 ms). Not every server copes: pymodbus's server (3.16) keeps only the
    last request of a segment and answers that one, and some gateways answer "busy". So it is
    the device's ``requests_in_flight`` (default 1: one at a time), and the driver goes back to
    one at a time for a device that answers only some of them (:attr:`NoAnswer.answered`).

Interface
    :class:`TcpClient` offers the few pymodbus client methods the driver uses
    (``read_holding_registers``... ``write_registers``, with ``device_id``), ``connect``,
    ``close`` and ``connected``, so :class:`drivers.modbus_link.ModbusLink` drives either.
    A request that gets no answer within ``timeout`` raises :class:`NoAnswer`; a lost or broken
    connection raises :class:`ConnectionError` (an OSError, as pymodbus's socket errors are).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MBAP = struct.Struct(">HHHB")  # transaction id, protocol id (0), length (unit id + PDU), unit id
_READ = struct.Struct(">BHH")  # function code, address, count
_WRITE_ONE = struct.Struct(">BHH")  # function code, address, value
_WRITE_MANY = struct.Struct(">BHHB")  # function code, address, count, byte count
MAX_LENGTH = 254  # unit id + the largest PDU (253 bytes)


class NoAnswer(Exception):
    """The unit did not answer within the timeout (the connection may still be fine).

    ``answered`` counts the requests sent together that did get their answer."""

    def __init__(self, message: str, answered: int = 0) -> None:
        super().__init__(message)
        self.answered = answered


@dataclass(frozen=True, slots=True)
class Answer:
    """A unit's answer: data, an exception response (``exception_code``), or a malformed answer (``problem``)."""

    function: int
    data: bytes = b""  # register bytes as on the wire, or packed bits
    exception_code: int = 0
    problem: str = ""

    def isError(self) -> bool:  # the name of pymodbus's method: the driver takes either answer
        return bool(self.exception_code or self.problem)

    def describe(self) -> str:
        """Why the answer is an error, for messages."""
        return f"exception code {self.exception_code}" if self.exception_code else self.problem

    @property
    def wire(self) -> bytes:
        """The register bytes; ValueError when the answer was malformed."""
        if self.problem:
            raise ValueError(self.problem)
        return self.data

    @property
    def registers(self) -> list[int]:
        data = self.wire
        return list(struct.unpack(f">{len(data) // 2}H", data))

    @property
    def bits(self) -> list[bool]:
        data = self.wire
        return [bool(byte >> i & 1) for byte in data for i in range(8)]


class TcpClient(asyncio.Protocol):
    """One Modbus TCP connection; one request, or one read's requests, at a time (the caller holds a lock).

    The client is its connection's asyncio protocol: the loop calls :meth:`data_received` and
    :meth:`connection_lost`."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout  # per request; the link sets it for each device's requests
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._tid = 0
        self._waiting: _Batch | None = None  # the requests on the wire and their answers

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> bool:
        """Open the connection; OSError (refused, unreachable, timed out) says why not."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            transport, _ = await loop.create_connection(lambda: self, self.host, self.port)
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._buffer.clear()
        return True

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._fail(ConnectionError("connection closed"))

    # ------------------------------------------------------------------ requests

    async def read_holding_registers(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._read(3, address, count, device_id)

    async def read_input_registers(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._read(4, address, count, device_id)

    async def read_coils(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._read(1, address, count, device_id)

    async def read_discrete_inputs(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._read(2, address, count, device_id)

    async def write_coil(self, address: int, value: bool, *, device_id: int) -> Answer:
        answer = await self.request(device_id, _WRITE_ONE.pack(5, address, 0xFF00 if value else 0))
        return _echo(5, answer, 4)

    async def write_register(self, address: int, value: int, *, device_id: int) -> Answer:
        answer = await self.request(device_id, _WRITE_ONE.pack(6, address, value))
        return _echo(6, answer, 4)

    async def write_registers(self, address: int, values: list[int], *, device_id: int) -> Answer:
        pdu = _WRITE_MANY.pack(16, address, len(values), 2 * len(values)) + struct.pack(f">{len(values)}H", *values)
        return _echo(16, await self.request(device_id, pdu), 4)

    async def read_blocks(self, requests: Sequence[tuple[int, int, int]], *, device_id: int) -> list[Answer]:
        """Send read requests (function code, address, count) together; their answers, in order.

        One write, each request with its own transaction id; the answers may come in any order.
        NoAnswer when not all of them came within ``timeout`` (``answered`` says how many did).
        """
        answers = await self.request_many(device_id, [_READ.pack(*r) for r in requests])
        return [_read_answer(function, count, pdu) for (function, _, count), pdu in zip(requests, answers, strict=True)]

    async def _read(self, function: int, address: int, count: int, unit: int) -> Answer:
        pdu = await self.request(unit, _READ.pack(function, address, count))
        return _read_answer(function, count, pdu)

    async def request(self, unit: int, pdu: bytes) -> bytes:
        """Send one PDU to ``unit``; the answer's PDU. NoAnswer after ``timeout``; ConnectionError."""
        return (await self.request_many(unit, (pdu,)))[0]

    async def request_many(self, unit: int, pdus: Sequence[bytes]) -> list[bytes]:
        """Send PDUs to ``unit`` in one write; their answers' PDUs in order. NoAnswer when not all
        came within ``timeout``; ConnectionError."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionError(f"not connected to {self.host}:{self.port}")
        first = (self._tid + 1) & 0xFFFF
        frames = []
        for offset, pdu in enumerate(pdus):
            frames.append(_MBAP.pack((first + offset) & 0xFFFF, 0, len(pdu) + 1, unit) + pdu)
        self._tid = (first + len(pdus) - 1) & 0xFFFF
        loop = asyncio.get_running_loop()
        batch = self._waiting = _Batch(first, loop.create_future(), len(pdus))
        transport.write(b"".join(frames))
        # A timer that fails the future, not asyncio.timeout (which cancels the task): one handle
        # per request instead of a context manager, and no cancellation for a library to swallow.
        timer = loop.call_at(loop.time() + self.timeout, _expire, batch.future)
        try:
            return await batch.future
        except TimeoutError:
            answered = len(pdus) - batch.missing
            if answered:
                raise NoAnswer(f"{batch.missing} of {len(pdus)} requests sent together got no answer within "
                               f"{self.timeout:g} s", answered) from None
            raise NoAnswer(f"no answer within {self.timeout:g} s") from None
        finally:
            timer.cancel()
            self._waiting = None

    # ------------------------------------------------------------------ the stream

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 8:
            tid, protocol, length, _unit = _MBAP.unpack_from(buffer)
            if protocol != 0 or not 2 <= length <= MAX_LENGTH:
                self._broken(f"not a Modbus TCP frame (protocol id {protocol}, length {length})")
                return
            end = 6 + length
            if len(buffer) < end:
                return
            pdu = bytes(buffer[7:end])
            del buffer[:end]
            batch = self._waiting
            if batch is None or not batch.put(tid, pdu):
                log.debug("modbus %s:%d: answer with transaction id %d dropped (nothing waits for it)",
                          self.host, self.port, tid)

    def _broken(self, why: str) -> None:
        log.warning("modbus %s:%d: %s; closing the connection", self.host, self.port, why)
        self._buffer.clear()
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        self._fail(ConnectionError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(ConnectionError(f"connection lost: {exc}" if exc else "connection closed by the device"))

    def _fail(self, error: Exception) -> None:
        batch = self._waiting
        if batch is not None and not batch.future.done():
            batch.future.set_exception(error)


def _expire(future: asyncio.Future[list[bytes]]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class _Batch:
    """Requests on the wire with consecutive transaction ids from ``first``, and their answers so far."""

    __slots__ = ("answers", "first", "future", "missing")

    def __init__(self, first: int, future: asyncio.Future[list[bytes]], count: int) -> None:
        self.first = first
        self.future = future
        self.answers: list[bytes | None] = [None] * count
        self.missing = count

    def put(self, tid: int, pdu: bytes) -> bool:
        """Take an answer; False when it is not one of ours (another id, a repeat, or too late)."""
        index = (tid - self.first) & 0xFFFF
        if index >= len(self.answers) or self.answers[index] is not None or self.future.done():
            return False
        self.answers[index] = pdu
        self.missing -= 1
        if not self.missing:
            self.future.set_result(self.answers)  # type: ignore[arg-type]  # every one is bytes now
        return True


def _read_answer(function: int, count: int, pdu: bytes) -> Answer:
    if pdu[0] != function:
        return _unexpected(function, pdu)
    size = 2 * count if function >= 3 else (count + 7) // 8
    if len(pdu) < 2 or pdu[1] != len(pdu) - 2 or pdu[1] != size:
        got = pdu[1] if len(pdu) > 1 else 0
        return Answer(function, problem=f"expected {size} data bytes, got {got} (frame of {len(pdu) - 2})")
    return Answer(function, pdu[2:])


def _unexpected(function: int, pdu: bytes) -> Answer:
    if pdu[0] == function | 0x80 and len(pdu) == 2:
        return Answer(function, exception_code=pdu[1])
    return Answer(function, problem=f"answer with function code {pdu[0]} ({len(pdu)} bytes) to function {function}")


def _echo(function: int, pdu: bytes, size: int) -> Answer:
    """A write's answer: the request's address and value (or count) echoed, ``size`` bytes."""
    if pdu[0] != function:
        return _unexpected(function, pdu)
    if len(pdu) != 1 + size:
        return Answer(function, problem=f"write answer of {len(pdu)} bytes, expected {1 + size}")
    return Answer(function, pdu[1:])
