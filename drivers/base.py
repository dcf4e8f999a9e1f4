"""The driver interface every protocol implements, and the Reading it produces.

A driver owns one connection to one device. The agent's device supervisor calls
``connect`` (with its own retry loop around it), then either ``read`` every interval
(poll mode) or ``subscribe`` once and ``check`` every interval (subscribe mode), and
``close`` when it stops or the connection fails. ``write`` is called only by the
safety gate (see ARCHITECTURE.md, invariant 1), which first asks ``exact`` what the device
would hold after the write and checks that value, not the request.

Every method raises only the project's own errors (:mod:`edge_agent.errors`):
``ConnectError``, ``ReadError`` or ``WriteError``, with the library error chained.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, repeat
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, overload

from edge_agent.config import DeviceConfig

GOOD = "good"
UNCERTAIN = "uncertain"
BAD = "bad"
STALE = "stale"
QUALITIES = (GOOD, UNCERTAIN, BAD, STALE)

Value = float | int | bool | str | None


class Reading(NamedTuple):
    """One sample of one point.

    A plain tuple on purpose: drivers make hundreds of thousands a second and the twin
    hands them to SQLite's ``executemany`` without copying.
    """

    point: str
    value: Value
    quality: str
    ts: float  # source timestamp, unix seconds (device time when the protocol has one)


class _Readings(Sequence[Reading]):
    """A sequence of readings that stands for a list of them: equal to any sequence of the same
    readings, unhashable like a list."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Readings | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self)!r})"


class DeviceRead(_Readings):
    """One device read whose readings share one quality and one source timestamp (a whole good
    Modbus read), kept as columns: its points (``names``, the same tuple every read) and ``values``.

    A sequence of :class:`Reading` like any other (``len``, indexing, iteration, ``==`` with a
    list), whose Reading tuples are made only when someone asks for them, once. On the way every
    read takes (the writer's latest values, the twin's history block, the v2 telemetry entry)
    nothing asks: they use the columns, and the latest values are made from the newest read of
    each device only when someone looks them up (:class:`edge_agent.store.latest.Latest`).
    Making a read's readings cost more than anything else the read path does (measured: about a
    third of the agent's CPU on the read path at 10 devices x 100 points every 100 ms, in cache-
    cold wake-ups). A slice is a plain list.
    """

    __slots__ = ("_readings", "names", "quality", "ts", "values")

    def __init__(self, names: tuple[str, ...], values: tuple[Value, ...], quality: str, ts: float) -> None:
        if len(names) != len(values):
            raise ValueError(f"a read of {len(names)} points with {len(values)} values")
        self.names = names
        self.values = values
        self.quality = quality
        self.ts = ts
        self._readings: list[Reading] | None = None

    @property
    def readings(self) -> list[Reading]:
        """The read's Reading tuples (made on first use, then kept)."""
        made = self._readings
        if made is None:
            # tuple.__new__ straight from zip's tuples builds each Reading in C; Reading(...) would
            # run the NamedTuple's Python-level __new__ for every point (81 vs 166 ns a point).
            made = self._readings = list(map(tuple.__new__, repeat(Reading),
                                             zip(self.names, self.values, repeat(self.quality), repeat(self.ts))))
        return made

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Reading: ...

    @overload
    def __getitem__(self, index: slice) -> list[Reading]: ...

    def __getitem__(self, index: int | slice) -> Reading | list[Reading]:
        return self.readings[index]

    def __iter__(self) -> Iterator[Reading]:
        return iter(self.readings)


class Batch(_Readings):
    """Readings of several reads, with the reads they came in (``reads``, in order: each a
    :class:`DeviceRead` or a plain list of readings). The twin hands what it stored on this way,
    so the telemetry makes one entry per device read from its columns; iterating it gives the
    readings of every read in turn (a DeviceRead's are made then)."""

    __slots__ = ("_count", "reads")

    def __init__(self) -> None:
        self.reads: list[Sequence[Reading]] = []
        self._count = 0

    def add(self, readings: Sequence[Reading]) -> None:
        """Append one read's readings."""
        self.reads.append(readings)
        self._count += len(readings)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Reading]:
        return chain.from_iterable(self.reads)

    @overload
    def __getitem__(self, index: int) -> Reading: ...

    @overload
    def __getitem__(self, index: slice) -> list[Reading]: ...

    def __getitem__(self, index: int | slice) -> Reading | list[Reading]:
        return list(self)[index]


ReadingSink = Callable[[Sequence[Reading]], None]


class Driver(ABC):
    """One connection to one device. Use as ``async with driver: ...``."""

    protocol: ClassVar[str]
    supports_subscribe: ClassVar[bool] = False

    def __init__(self, device: DeviceConfig, data_dir: Path) -> None:
        self.device = device
        self.data_dir = data_dir

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise ConnectError when the device cannot be reached."""

    @abstractmethod
    async def read(self) -> Sequence[Reading]:
        """Read every configured point once; raise ReadError when the device fails.

        A point the device answers for with an error (bad node, exception response) comes
        back with quality "bad" rather than failing the whole read.
        """

    @abstractmethod
    async def write(self, point: str, value: Any) -> None:
        """Write one point, encoded exactly as ``read`` decodes it; raise WriteError."""

    @abstractmethod
    async def exact(self, point: str, value: Any) -> bool | int | float:
        """The value ``read`` would return after ``write(point, value)``; raise WriteError when it cannot be written.

        Runs the same encoding as ``write`` (scale and offset inverted, integer rounding, float32
        rounding, the node's own type) and decodes the result, so the two cannot drift apart.
        Stricter than ``write`` about kinds: a boolean only for a boolean point, a real number
        (not a boolean, not a string) for a numeric one.
        """

    def resolution(self, point: str, value: float) -> float:
        """The smallest change a reading of ``point`` near ``value`` can show: one raw step.

        1 for an integer register or node (times its scale), the float32 spacing for a Float,
        0 where the value is continuous or the type is not known yet.
        """
        return 0.0

    @abstractmethod
    async def close(self) -> None:
        """Close the connection; never raises."""

    async def subscribe(self, sink: ReadingSink) -> None:
        """Start pushing readings to ``sink`` (called on the event loop) as the device reports changes."""
        raise NotImplementedError(f"{self.protocol} does not support subscriptions")

    async def check(self) -> None:
        """In subscribe mode, called every interval: raise ReadError if the link is dead.

        The default trusts the protocol's own keep-alive and does nothing.
        """
        return None

    async def __aenter__(self) -> Driver:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


_SURROGATES = re.compile("[\ud800-\udfff]")


def valid_text(value: str) -> str:
    """``value`` with U+FFFD for each surrogate in it.

    A Python str holds code points, so a surrogate in one is never half of a pair: it is what
    asyncua makes of the bytes of an OPC UA String that are not UTF-8 (``surrogateescape``; an old
    PLC's Latin-1 "\u00b0C", say). SQLite refuses such a str, and JSON and protobuf would pass on
    text that other tools cannot read back."""
    if value.isascii():
        return value
    return _SURROGATES.sub("\ufffd", value)


def now() -> float:
    """Wall-clock time in unix seconds, used when a protocol has no source timestamp."""
    return time.time()


def source_age(point: str, reading: Reading) -> float:
    """Seconds since the reading's source timestamp (the default notion of how old data is)."""
    return time.time() - reading.ts


def float32_spacing(value: float) -> float:
    """The gap between ``value`` and the next float32 away from zero (one float32 ulp)."""
    if not math.isfinite(value):
        return math.inf
    if value == 0:
        return math.ldexp(1.0, -149)  # the smallest subnormal
    _, exponent = math.frexp(value)  # value = m * 2**exponent with 0.5 <= |m| < 1
    return math.ldexp(1.0, max(exponent - 24, -149))  # a 24-bit significand
