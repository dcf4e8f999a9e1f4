"""Modbus TCP and RTU driver (pymodbus 3.16).

The read plan is built once, at init (see :mod:`drivers.modbus_codec`); ``read`` sends one
request per block, under the device's lock, so one device's reads and writes never interleave.
With ``requests_in_flight = N`` (Modbus TCP) a read's requests go N at a time in one write
(:meth:`drivers.modbus_tcp.TcpClient.read_blocks`); a server that answers only some of them,
or answers "server busy", gets them again one at a time, and one at a time from then on, with a
warning.
The connection is a :class:`~drivers.modbus_link.ModbusLink`: the device's own TCP connection
(``connection = "own"``, the default), or one shared with the other devices on the same serial
port, or on the same ``host:port`` with ``connection = "shared"`` (a TCP gateway in front of an
RS-485 line): one request on the wire at a time, each with this device's unit id and timeout.
See that module for why, and how a dead unit is kept from stalling the others.

Errors: a block answered with a Modbus exception response (illegal address, device busy...)
turns only its points' quality to "bad"; so does a float register holding NaN or infinity (for
that point only). A unit that does not answer, or a lost connection, raises ReadError; a failed
connect raises ConnectError. The device supervisor then backs this device off on its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers import modbus_codec, modbus_link
from drivers.base import BAD, GOOD, DeviceRead, Driver, Reading, Value
from drivers.modbus_codec import WRITABLE_TABLES, Block, build_plan, encode
from drivers.modbus_link import ModbusLink
from drivers.modbus_tcp import Answer, NoAnswer
from edge_agent.config import DeviceConfig, ModbusDevice, ModbusPoint
from edge_agent.errors import ReadError, WriteError

if TYPE_CHECKING:
    from pymodbus.pdu import ModbusPDU

log = logging.getLogger(__name__)

_READERS = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}
_FUNCTIONS = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_SERVER_BUSY = 6  # Modbus exception code: "server device busy"
_isfinite = math.isfinite
_Group = tuple[int, tuple[tuple[int, int, int], ...], str]  # first block, (function, address, count) each, what


def _span(block: Block) -> str:
    """A block's registers for messages: ``holding 0..123``."""
    return f"{block.table} {block.address}..{block.address + block.count - 1}"


def _groups(blocks: tuple[Block, ...], in_flight: int) -> tuple[_Group, ...]:
    """The plan's blocks in groups of ``in_flight``, each sent in one go; () when that is one at a time."""
    if in_flight < 2 or len(blocks) < 2:
        return ()
    groups = []
    for first in range(0, len(blocks), in_flight):
        chunk = blocks[first:first + in_flight]
        requests = tuple((_FUNCTIONS[b.table], b.address, b.count) for b in chunk)
        groups.append((first, requests, f"reading {', '.join(map(_span, chunk))}"))
    return tuple(groups)


def _readings(names: Iterable[str], values: Iterable[Value], quality: str, ts: float) -> list[Reading]:
    # tuple.__new__ straight from zip's tuples builds each Reading in C; Reading(...) would run
    # the NamedTuple's Python-level __new__ for every point (measured: 81 vs 166 ns per point).
    return list(map(tuple.__new__, repeat(Reading), zip(names, values, repeat(quality), repeat(ts))))


def _why(response: ModbusPDU | Answer) -> str:
    """What an error answer says: its exception code, or what was wrong with it."""
    if isinstance(response, Answer):
        return response.describe()
    return f"exception code {response.exception_code}"


def _decode(block: Block, response: ModbusPDU | Answer) -> list[Value]:
    """A block's values from its answer; ValueError when the answer is malformed (short or long)."""
    if block.bits:
        return block.decode(response.bits)
    if isinstance(response, Answer):  # TCP: the register bytes as they came
        return block.decode_wire(response.wire)
    return block.decode(response.registers)


def _checked_readings(names: Iterable[str], values: Iterable[Value], ts: float) -> list[Reading]:
    """Readings with quality "bad" for the values that are NaN or infinite, "good" for the rest."""
    return [Reading(name, value, GOOD if value is None or _isfinite(value) else BAD, ts)  # type: ignore[arg-type]
            for name, value in zip(names, values, strict=True)]


class ModbusDriver(Driver):
    """One Modbus TCP (``protocol = "modbus"``) or RTU (``"modbus-rtu"``) device."""

    protocol = "modbus"

    def __init__(self, device: DeviceConfig, data_dir: Path) -> None:
        if not isinstance(device, ModbusDevice):
            raise TypeError(f"ModbusDriver needs a ModbusDevice, got {type(device).__name__}")
        super().__init__(device, data_dir)
        self.modbus: ModbusDevice = device
        self.blocks: tuple[Block, ...] = build_plan(device.points, device.max_registers, device.max_gap)
        # (pymodbus method, what for messages) per block, made once: read() allocates no strings.
        self._requests = tuple((_READERS[b.table], f"reading {_span(b)}") for b in self.blocks)
        self._names: tuple[str, ...] = tuple(name for b in self.blocks for name in b.names)
        self._points: dict[str, ModbusPoint] = {p.name: p for p in device.points}
        self._groups = _groups(self.blocks, device.requests_in_flight) if device.protocol == "modbus" else ()
        self._link: ModbusLink | None = None
        self._lock = asyncio.Lock()
        self._failing_blocks: set[int] = set()  # blocks whose last answer was an exception response
        self._nonfinite: set[int] = set()  # blocks whose last answer held NaN or infinity

    @property
    def where(self) -> str:
        """The device's address for messages: host:port or the serial port."""
        if self.modbus.protocol == "modbus-rtu":
            return self.modbus.serial_port
        return f"{self.modbus.host}:{self.modbus.port}"

    # ----------------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Join the shared link for this device's address, opening it if needed; ConnectError on failure."""
        await self.close()
        link = modbus_link.acquire(self.modbus)
        try:
            await link.connect(self.device.name, self.device.timeout)
        except BaseException:
            modbus_link.release(link, self.modbus)
            raise
        self._link = link
        log.debug("modbus device %s: unit %d on %s", self.device.name, self.modbus.unit_id, self.where)

    async def close(self) -> None:
        """Leave the shared link (the last device on it closes it); never raises."""
        link, self._link = self._link, None
        if link is not None:
            modbus_link.release(link, self.modbus)

    async def _execute(self, error: type[ReadError] | type[WriteError], what: str, method: str,
                       *args: Any, **kwargs: Any) -> ModbusPDU | Answer:
        link = self._link
        if link is None:
            raise error(self.device.name, f"not connected to {self.where}")
        return await link.execute(self.device.name, self.modbus.unit_id, self.device.timeout, error, what,
                                  method, *args, **kwargs)

    # ----------------------------------------------------------------------- read

    async def read(self) -> Sequence[Reading]:
        """Read every point once: one request per block of the plan, or per group of blocks sent together.

        A read whose every block came back good is a :class:`~drivers.base.DeviceRead` (its values
        also as columns); one with a bad block or a value that is not a number, a plain list."""
        async with self._lock:
            ts = time.time()
            if not self._groups:
                responses = await self._request_each(0, len(self.blocks))
            else:
                responses = []
                for group in self._groups:
                    if self._groups:
                        responses += await self._request_together(group)
                    else:  # an earlier group of this read found the device cannot take them together
                        responses += await self._request_each(group[0], len(group[1]))
        return self._readings(responses, ts)

    async def _request(self, index: int) -> ModbusPDU | Answer:
        block = self.blocks[index]
        method, what = self._requests[index]
        return await self._execute(ReadError, what, method, block.address, count=block.count)

    async def _request_each(self, first: int, count: int) -> list[ModbusPDU | Answer]:
        """The answers for blocks ``first`` .. ``first + count - 1``, one request at a time."""
        return [await self._request(index) for index in range(first, first + count)]

    async def _request_together(self, group: _Group) -> list[ModbusPDU | Answer]:
        """Send a group of the plan's read requests at once (``requests_in_flight``); their answers.

        A server that answers only some of them, or answers "server busy", gets the group again
        one request at a time, and every read after that too (for as long as this driver lives:
        a reconnect tries again, with another warning)."""
        first, requests, what = group
        try:
            answers: list[Answer] = await self._execute(ReadError, what, "read_blocks", requests)  # type: ignore[assignment]
        except ReadError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, NoAnswer) and cause.answered):
                raise
            self._one_at_a_time(f"answered {cause.answered} of {len(requests)} requests sent together")
            return await self._request_each(first, len(requests))
        responses: list[ModbusPDU | Answer] = []
        for index, answer in enumerate(answers, start=first):
            if answer.exception_code == _SERVER_BUSY and len(answers) > 1:
                self._one_at_a_time("answered \"server busy\" to requests sent together")
                responses.append(await self._request(index))
            else:
                responses.append(answer)
        return responses

    def _one_at_a_time(self, why: str) -> None:
        """The device cannot take several requests at once: one at a time from now on."""
        if self._groups:
            self._groups = ()
            log.warning("modbus device %s: %s; sending one request at a time from now on (set "
                        "requests_in_flight = 1 for this device to say so)", self.device.name, why)

    def _readings(self, responses: list[ModbusPDU | Answer], ts: float) -> Sequence[Reading]:
        """The readings of one answer per block: a DeviceRead when every block is good."""
        values: list[Value] = []
        for index, response in enumerate(responses):
            good = self._good_values(index, self.blocks[index], response)
            if good is None:
                break
            values += good
        else:
            return DeviceRead(self._names, tuple(values), GOOD, ts)
        readings: list[Reading] = []
        for index, response in enumerate(responses):
            readings += self._block_readings(index, self.blocks[index], response, ts)
        return readings

    def _good_values(self, index: int, block: Block, response: ModbusPDU | Answer) -> list[Value] | None:
        """A block's values when its answer is good and every value a number; None otherwise
        (:meth:`_block_readings` then says what is wrong)."""
        if response.isError():
            return None
        try:
            values = _decode(block, response)
        except ValueError:
            return None
        if block.may_be_nonfinite and not all(map(_isfinite, values)):  # type: ignore[arg-type]
            return None
        if self._failing_blocks:
            self._block_recovered(index, block)
        if self._nonfinite:
            self._nonfinite.discard(index)
        return values

    def _block_readings(self, index: int, block: Block, response: ModbusPDU | Answer, ts: float) -> list[Reading]:
        if response.isError():
            self._block_failed(index, block, _why(response))
            return _readings(block.names, repeat(None), BAD, ts)
        try:
            values = _decode(block, response)
        except ValueError as exc:  # a malformed answer: short or long
            self._block_failed(index, block, str(exc))
            return _readings(block.names, repeat(None), BAD, ts)
        if self._failing_blocks:
            self._block_recovered(index, block)
        if block.may_be_nonfinite and not all(map(_isfinite, values)):  # type: ignore[arg-type]
            self._nonfinite_values(index, block, values)
            return _checked_readings(block.names, values, ts)
        if self._nonfinite:
            self._nonfinite.discard(index)
        return _readings(block.names, values, GOOD, ts)

    def _nonfinite_values(self, index: int, block: Block, values: list[Value]) -> None:
        level = logging.DEBUG if index in self._nonfinite else logging.WARNING
        self._nonfinite.add(index)
        bad = [f"{name} = {value}" for name, value in zip(block.names, values, strict=True)
               if not _isfinite(value)]  # type: ignore[arg-type]
        log.log(level, "modbus device %s: not a number: %s; quality bad", self.device.name, ", ".join(bad))

    def _block_failed(self, index: int, block: Block, cause: str) -> None:
        level = logging.DEBUG if index in self._failing_blocks else logging.WARNING
        self._failing_blocks.add(index)
        log.log(level, "modbus device %s: %s %d..%d answered %s; %d points bad", self.device.name,
                block.table, block.address, block.address + block.count - 1, cause, len(block.names))

    def _block_recovered(self, index: int, block: Block) -> None:
        if index in self._failing_blocks:
            self._failing_blocks.discard(index)
            log.info("modbus device %s: %s %d..%d readable again", self.device.name, block.table,
                     block.address, block.address + block.count - 1)

    # ----------------------------------------------------------------------- write

    async def write(self, point: str, value: Any) -> None:
        """Write one point, encoded exactly as ``read`` decodes it; raise WriteError."""
        target = self._writable_point(point)
        try:
            payload = encode(target, value)
        except ValueError as exc:
            raise WriteError(self.device.name, str(exc), point=point) from exc
        async with self._lock:
            try:
                response = await self._send(target, payload)
            except WriteError as exc:
                raise WriteError(self.device.name, exc.reason, point=point) from exc.__cause__
        if response.isError():
            raise WriteError(self.device.name, f"writing refused: {_why(response)}", point=point)
        log.debug("modbus device %s: wrote %s = %r (%r)", self.device.name, point, value, payload)

    async def exact(self, point: str, value: Any) -> bool | int | float:
        """What a read of ``point`` returns after writing ``value``: the registers ``write`` would send, decoded."""
        target = self._writable_point(point)
        try:
            return modbus_codec.exact(target, value)
        except ValueError as exc:
            raise WriteError(self.device.name, str(exc), point=point) from exc

    def resolution(self, point: str, value: float) -> float:
        """One raw step of ``point`` near ``value`` (its scale for integer registers)."""
        target = self._points.get(point)
        return modbus_codec.resolution(target, value) if target is not None else 0.0

    def _writable_point(self, name: str) -> ModbusPoint:
        target = self._points.get(name)
        if target is None:
            raise WriteError(self.device.name, "no such point", point=name)
        if target.register not in WRITABLE_TABLES:
            raise WriteError(self.device.name, f"is in the read-only {target.register} table", point=name)
        if not target.writable:
            raise WriteError(self.device.name, "is not writable", point=name)
        return target

    async def _send(self, target: ModbusPoint, payload: list[int] | bool) -> ModbusPDU | Answer:
        what = f"writing {target.register} {target.address}"
        if isinstance(payload, bool):
            return await self._execute(WriteError, what, "write_coil", target.address, payload)
        if len(payload) == 1:
            return await self._execute(WriteError, what, "write_register", target.address, payload[0])
        return await self._execute(WriteError, what, "write_registers", target.address, payload)
