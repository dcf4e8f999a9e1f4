"""Read a run of Modbus registers (or bits) once, over TCP or RTU, and decode it every way.

Read-only by construction: the only requests sent are the four read functions (FC1 coils, FC2
discrete inputs, FC3 holding registers, FC4 input registers), at most 125 registers or 2000 bits
each, as the Modbus spec allows. pymodbus's own retrying and reconnecting are off, as in the
driver: one attempt, one clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from edge_agent.commission.decode import Decoding, decode
from edge_agent.errors import ConnectError, ReadError, UsageError

log = logging.getLogger(__name__)

TABLES = ("holding", "input", "coil", "discrete")
_READERS = {"holding": "read_holding_registers", "input": "read_input_registers", "coil": "read_coils",
            "discrete": "read_discrete_inputs"}
_MOST = {"holding": 125, "input": 125, "coil": 2000, "discrete": 2000}  # per request, Modbus spec
_LINK_ERRORS = (ModbusException, OSError)
EXCEPTION_CODES = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "server device failure",
    5: "acknowledge", 6: "server device busy", 8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
DEVICE = "probe"  # the name errors carry: there is no configured device


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusTarget:
    """Where to read: a TCP ``host``:``port``, or a ``serial_port`` with its settings; and the unit."""

    host: str = ""
    port: int = 502
    serial_port: str = ""
    baudrate: int = 19200
    parity: str = "E"
    stopbits: int = 1
    bytesize: int = 8
    unit: int = 1
    timeout: float = 3.0

    @property
    def where(self) -> str:
        """host:port, or the serial port, for messages."""
        if self.serial_port:
            return self.serial_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Probe:
    """What one read returned: the raw registers (0/1 for bits) and every decoding of them."""

    target: ModbusTarget
    table: str
    address: int
    registers: tuple[int, ...]
    decoded: tuple[Decoding, ...]

    @property
    def bits(self) -> bool:
        return self.table in ("coil", "discrete")


def parse_host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` -> (host, port); UsageError when it is none of those."""
    host, port = text, 502
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f'expected HOST:PORT, got "{text}"')
        host, rest = inside, rest[1:]
        port_text = rest or "502"
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        port_text = "502"
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f'expected HOST:PORT with a port number, got "{text}"') from None
    if not host or not 1 <= port <= 65535:
        raise UsageError(f'expected HOST:PORT with a port from 1 to 65535, got "{text}"')
    return host, port


async def probe(target: ModbusTarget, table: str, address: int, count: int) -> Probe:
    """Read ``count`` registers (or bits) of ``table`` from ``address`` once and decode them.

    Raises UsageError for a range outside the table, ConnectError when the device cannot be
    reached, ReadError when it fails to answer or answers with an exception response.
    """
    if table not in TABLES:
        raise UsageError(f"--table: expected one of {', '.join(TABLES)}, got {table!r}")
    if not 0 <= address <= 65535 or count < 1 or address + count > 65536:
        raise UsageError(f"--address {address} --count {count}: expected addresses within 0..65535")
    client = _client(target)
    try:
        await _connect(client, target)
        values = await _read(client, target, table, address, count)
    finally:
        client.close()
    registers = tuple(int(v) for v in values)
    if table in ("coil", "discrete"):  # one bit each: nothing to decode but the bit itself
        decoded = tuple(Decoding(address + i, "bool", "big", "big", bool(bit), True) for i, bit in enumerate(registers))
    else:
        decoded = tuple(decode(registers, address))
    return Probe(target, table, address, registers, decoded)


def _client(target: ModbusTarget) -> ModbusBaseClient:
    common: dict[str, Any] = {"name": DEVICE, "timeout": target.timeout, "retries": 0, "reconnect_delay": 0}
    if target.serial_port:
        return AsyncModbusSerialClient(target.serial_port, baudrate=target.baudrate, parity=target.parity,
                                       stopbits=target.stopbits, bytesize=target.bytesize, **common)
    return AsyncModbusTcpClient(target.host, port=target.port, **common)


async def _connect(client: ModbusBaseClient, target: ModbusTarget) -> None:
    try:
        connected = await client.connect()
    except (*_LINK_ERRORS, ValueError) as exc:
        raise ConnectError(DEVICE, f"cannot connect to {target.where}: {exc}") from exc
    if not connected:  # pymodbus keeps the cause to itself and returns False
        raise ConnectError(DEVICE, f"cannot connect to {target.where} (refused, unreachable or no answer "
                                   f"within {target.timeout:g} s)")


async def _read(client: ModbusBaseClient, target: ModbusTarget, table: str, address: int,
                count: int) -> list[int | bool]:
    request: Callable[..., Awaitable[ModbusPDU]] = getattr(client, _READERS[table])
    values: list[int | bool] = []
    for start in range(address, address + count, _MOST[table]):
        size = min(_MOST[table], address + count - start)
        span = f"{table} {start}..{start + size - 1} of unit {target.unit} at {target.where}"
        try:
            response = await request(start, count=size, device_id=target.unit)
        except _LINK_ERRORS as exc:
            raise ReadError(DEVICE, f"reading {span} failed: {exc}") from exc
        if response.isError():
            code = response.exception_code
            raise ReadError(DEVICE, f"reading {span}: the device answered exception code {code} "
                                    f"({EXCEPTION_CODES.get(code, 'unknown')})")
        got = list(response.bits[:size]) if table in ("coil", "discrete") else list(response.registers)
        if len(got) != size:
            raise ReadError(DEVICE, f"reading {span}: asked for {size}, the answer holds {len(got)}")
        values += got
    return values
