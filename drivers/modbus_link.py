"""Modbus connections shared by the devices configured on them: TCP gateways and RTU buses.

Why share
    In a plant many Modbus devices sit behind one address: a TCP gateway in front of an RS-485
    line of drives (one ``host:port``, one unit id per drive), or several meters on one serial
    port. The gateway serves one transaction at a time (the serial line behind it can carry no
    more) and often accepts only a handful of TCP connections; a serial port can be opened once.
    So the devices on one serial port (``"modbus-rtu"``), and the TCP devices on one
    ``host:port`` that say ``connection = "shared"``, use one :class:`ModbusLink`: one client
    (the lean :class:`~drivers.modbus_tcp.TcpClient` on TCP, pymodbus's on a serial port), one
    request on the wire at a time, each with the unit id and the timeout of the device that
    sent it. A TCP device with ``connection = "own"`` (the default) gets a link of
    its own, as before: a server that answers connections in parallel is read faster that way
    (bench/bench_plant.py measures both).

The pool
    :func:`acquire` hands a device's driver the link for its address, creating it on first use;
    :func:`release` gives it back, and the last device to leave closes it. The pool belongs to
    the running event loop (asyncua and pymodbus objects cannot cross loops), so an agent, a test
    or a benchmark that runs its own loop gets its own links.

A dead unit does not stall the others (node-red-contrib-modbus #446)
    A unit that does not answer within its device's ``timeout`` fails only that device's read:
    its driver raises ReadError, the device supervisor (``edge_agent/device.py``) marks its points
    bad and retries it with its own capped exponential backoff (``retry_min`` .. ``retry_max``),
    while the other units' requests keep going at their own interval. The link stays open: a
    silent unit says nothing about the connection. Each retry still holds the line for one
    timeout (the gateway behind it waits as long for the drive), which is why the dead unit is
    retried with backoff rather than at its interval.

    The link is closed (and every device on it reconnects) when the connection itself fails
    (refused, reset, closed by the peer), or, on TCP, when every unit using the link has timed
    out since the last answer from any of them: then it is the connection, or the gateway, that
    is dead, not a unit. A device alone on its connection therefore reconnects after its first
    timeout, as it always did. A serial port is never reopened for a silent unit.

Requests are serialised by the link's own lock (pymodbus's serial client has one too, which is
then never contended); the per-request timeout is set on the client under that lock. pymodbus's
own reconnecting, retrying and disconnect-after-N-timeouts are all switched off, and the TCP client
has none: this module and the device supervisor decide.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

from drivers.modbus_tcp import Answer, NoAnswer, TcpClient
from edge_agent.config import ModbusDevice
from edge_agent.errors import ConnectError, ReadError, WriteError

if TYPE_CHECKING:
    from pymodbus.client.base import ModbusBaseClient
    from pymodbus.pdu import ModbusPDU

log = logging.getLogger(__name__)

LinkKey = tuple[str, ...]  # ("tcp", host, port), ("tcp", host, port, device) for "own", ("rtu", serial port)

Errors = tuple[type[BaseException], ...]


def _errors(serial: bool) -> tuple[Errors, Errors]:
    """What the link's client raises when a unit does not answer, and when the link itself fails.

    The TCP client raises NoAnswer and OSErrors. pymodbus (serial) raises ModbusIOException for a
    timeout (with retries=0) and other ModbusExceptions (ConnectionException) or OSErrors for a
    failed port; it is imported only when a serial line is configured (about 11 MB of RSS).
    """
    if not serial:
        return (NoAnswer,), (OSError,)
    from pymodbus.exceptions import ModbusException, ModbusIOException

    return (ModbusIOException,), (ModbusException, OSError)
_NEVER = 2**31  # pymodbus disconnects after this many timeouts in a row: never, we decide


def link_key(device: ModbusDevice) -> LinkKey:
    """The address devices share a link by: host and port, or the serial port."""
    if device.protocol == "modbus-rtu":
        return ("rtu", device.serial_port)
    if device.connection == "shared":
        return ("tcp", device.host, str(device.port))
    return ("tcp", device.host, str(device.port), device.name)


class ModbusLink:
    """One Modbus TCP connection or serial port, shared by every device configured on it."""

    def __init__(self, key: LinkKey, settings: ModbusDevice) -> None:
        self.key = key
        self.settings = settings  # the serial settings (config checks that sharing devices agree)
        self.where = key[1] if key[0] == "rtu" else f"{key[1]}:{key[2]}"
        self.serial = key[0] == "rtu"
        self.client: ModbusBaseClient | TcpClient | None = None
        self.units: Counter[int] = Counter()  # unit id -> devices using the link with it
        self._silent: set[int] = set()  # units that timed out since the last answer from anyone
        self._lock = asyncio.Lock()
        self._no_answer_errors, self._link_errors = _errors(self.serial)
        self._connect_errors: Errors = (*self._link_errors, ValueError)
        self._close_errors: Errors = (*self._link_errors, RuntimeError)

    @property
    def users(self) -> int:
        """How many device drivers hold the link."""
        return sum(self.units.values())

    @property
    def connected(self) -> bool:
        """True while the connection (or the serial port) is open."""
        return self.client is not None and self.client.connected

    def _new_client(self, timeout: float) -> ModbusBaseClient | TcpClient:
        d = self.settings
        if not self.serial:
            return TcpClient(d.host, d.port, timeout)
        from pymodbus.client import AsyncModbusSerialClient

        client = AsyncModbusSerialClient(d.serial_port, baudrate=d.baudrate, parity=d.parity, stopbits=d.stopbits,
                                         bytesize=d.bytesize, name=self.where, timeout=timeout, retries=0,
                                         reconnect_delay=0)
        client.set_max_no_responses(_NEVER)
        return client

    async def connect(self, device: str, timeout: float) -> None:
        """Open the connection unless it is open; raise ConnectError (naming ``device``) when that fails."""
        async with self._lock:
            if self.connected:
                return
            self.close("reconnecting")
            client = self._new_client(timeout)
            try:
                connected = await client.connect()
            except self._connect_errors as exc:
                client.close()
                raise ConnectError(device, f"cannot connect to {self.where}: {exc}") from exc
            if not connected:
                # pymodbus swallows the cause (refused, unreachable, timeout) and returns False.
                client.close()
                raise ConnectError(device, f"cannot connect to {self.where} (refused, unreachable or no "
                                           f"answer within {timeout:g} s)")
            self.client = client
            self._silent.clear()
            log.debug("modbus link %s: connected", self.where)

    async def execute(self, device: str, unit: int, timeout: float, error: type[ReadError] | type[WriteError],
                      what: str, method: str, *args: Any, **kwargs: Any) -> ModbusPDU | Answer:
        """Send one request for ``unit`` and wait at most ``timeout`` for its answer.

        ``method`` names the client method (pymodbus's names) (``read_holding_registers``...). Raises
        ``error`` (ReadError or WriteError, naming ``device``) when the link is down or the unit
        does not answer; an exception response is returned like any answer.
        """
        async with self._lock:
            client = self.client
            if client is None or not client.connected:
                # Checked before every request: pymodbus would otherwise quietly reconnect.
                raise error(device, f"not connected to {self.where}")
            # One timeout per client; under our lock, set it for this request.
            if isinstance(client, TcpClient):
                client.timeout = timeout
            else:
                client.ctx.comm_params.timeout_connect = timeout
            try:
                response: ModbusPDU | Answer = await getattr(client, method)(*args, device_id=unit, **kwargs)
            except self._no_answer_errors as exc:
                if client.connected:
                    if getattr(exc, "answered", 0):  # some of the requests sent together were answered
                        self._silent.clear()
                    else:
                        self._no_answer(unit)
                    raise error(device, f"{what}: no answer from unit {unit} at {self.where} within "
                                        f"{timeout:g} s") from exc
                self.close(f"connection lost: {exc}")
                raise error(device, f"{what}: connection to {self.where} lost: {exc}") from exc
            except self._link_errors as exc:
                self.close(str(exc))
                raise error(device, f"{what} failed: {exc}") from exc
            self._silent.clear()  # an answer, even an exception response, proves the link alive
            return response

    def _no_answer(self, unit: int) -> None:
        self._silent.add(unit)
        if not self.serial and self._silent.issuperset(self.units):
            # Nobody on this connection answers: the connection (or the gateway) is dead, not a unit.
            self.close(f"no answer from unit(s) {', '.join(map(str, sorted(self._silent)))}")

    def close(self, reason: str) -> None:
        """Close the connection (the link stays in the pool; the next connect reopens it)."""
        client, self.client = self.client, None
        self._silent.clear()
        if client is None:
            return
        log.debug("modbus link %s: closing (%s)", self.where, reason)
        try:
            client.close()
        except self._close_errors as exc:
            log.debug("modbus link %s: error while closing: %s", self.where, exc)


# --------------------------------------------------------------------------- the pool

_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[LinkKey, ModbusLink]] = \
    weakref.WeakKeyDictionary()


def _pool() -> dict[LinkKey, ModbusLink]:
    return _POOLS.setdefault(asyncio.get_running_loop(), {})


def acquire(device: ModbusDevice) -> ModbusLink:
    """The link for ``device``'s address (created on first use), now held by the device."""
    pool = _pool()
    key = link_key(device)
    link = pool.get(key)
    if link is None:
        link = pool[key] = ModbusLink(key, device)
    link.units[device.unit_id] += 1
    return link


def release(link: ModbusLink, device: ModbusDevice) -> None:
    """Give the link back; the last device to leave closes it."""
    link.units[device.unit_id] -= 1
    if link.units[device.unit_id] <= 0:
        del link.units[device.unit_id]
    if link.users == 0:
        link.close("no device uses it")
        pool = _pool()
        if pool.get(link.key) is link:
            del pool[link.key]


def links() -> tuple[ModbusLink, ...]:
    """The links open (or held) on the running loop, for status and tests."""
    return tuple(_pool().values())
