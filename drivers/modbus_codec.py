"""Modbus register codec: the read plan, and decoding/encoding of point values.

Kept apart from the client (``drivers/modbus.py``) so it can be tested and benchmarked
without a connection.

The read plan coalesces neighbouring points of one table into as few requests as possible
(:func:`build_plan`), once, when the driver is created. Each :class:`Block` then decodes a
response in a handful of C calls: the block's registers are packed into bytes once, and every
*run* of adjacent points of the same type and word order is unpacked by one precompiled
:class:`struct.Struct`.

Byte layout: ``word_order = "big"`` puts the most significant register first, ``"little"`` puts
it last; ``byte_order = "big"`` (the Modbus spec) puts the most significant byte of each register
first, ``"little"`` swaps the two. The four combinations of a value with bytes A B C D (most
significant first), as devices ship them::

    word big,    byte big     ABCD   [0xAABB, 0xCCDD]     pack ">H", unpack ">"
    word little, byte big     CDAB   [0xCCDD, 0xAABB]     pack "<H", unpack "<"
    word big,    byte little  BADC   [0xBBAA, 0xDDCC]     pack "<H", unpack ">"
    word little, byte little  DCBA   [0xDDCC, 0xBBAA]     pack ">H", unpack "<"

A block packs its registers once big-endian (``>H``) and, when a point needs it, once with each
register's bytes swapped (``<H``); each run then unpacks from one of the two with the struct
byte order of its word order. So every combination costs the same one C call per run::

    float32 1.5 = 0x3FC00000, word little: [0x0000, 0x3FC0]
    packed "<H": 00 00 C0 3F  ==  struct.pack("<f", 1.5)

Byte order applies to 16-bit values too (a swapped int16 is [0xBBAA]); word order only to
values of two or four registers.

Float values that are NaN or infinite are returned as they are; :meth:`Block.decode` tells the
driver where they are (:attr:`Block.may_be_nonfinite`), and the driver gives them quality "bad".

Values: ``value = raw * scale + offset``; integer types stay ``int`` when scale is 1 and
offset 0, and become ``float`` otherwise. Writes invert this exactly (:func:`encode`), and
:func:`exact` says what a write will really leave in the device: the registers :func:`encode`
makes, decoded the way a read decodes them (one code path, so the safety gate checks exactly
what is written).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from drivers.base import Value, float32_spacing
from edge_agent.config import ModbusPoint

REGISTER_TABLES = ("holding", "input")
BIT_TABLES = ("coil", "discrete")
WRITABLE_TABLES = ("holding", "coil")
MAX_REGISTERS = 125  # per read request (FC3/FC4), Modbus spec
MAX_BITS = 2000  # per read request (FC1/FC2), Modbus spec

# type -> struct code; "bool" has none (bits come from coils and discrete inputs).
STRUCT_CODES = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
    "int64": "q", "uint64": "Q", "float32": "f", "float64": "d",
}
INTEGER_RANGES = {
    "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1),
}


@dataclass(frozen=True, slots=True)
class Run:
    """Adjacent points of one type, word and byte order inside a register block, unpacked at once.

    ``swapped``: unpacked from the block's registers packed with their bytes swapped (``<H``).
    """

    unpack_from: struct.Struct
    swapped: bool
    byte_offset: int
    scales: tuple[float, ...] | None  # None: scale 1, offset 0 for every point (no arithmetic)
    offsets: tuple[float, ...] | None


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers (or bits) of ``table`` from ``address``.

    ``names`` lists the block's points in the order :meth:`decode` returns their values.
    """

    table: str
    address: int
    count: int
    names: tuple[str, ...]
    runs: tuple[Run, ...] = ()
    bit_indexes: tuple[int, ...] = ()
    pack_big: struct.Struct | None = None
    pack_little: struct.Struct | None = None
    may_be_nonfinite: bool = False  # a float type, or a scale that can overflow: the driver checks isfinite

    @property
    def bits(self) -> bool:
        """True for coil and discrete-input blocks."""
        return self.table in BIT_TABLES

    def decode(self, data: Sequence[int] | Sequence[bool]) -> list[Value]:
        """The values of ``names`` from the registers (or bits) the device returned."""
        if self.bits:
            if len(data) < self.count:
                raise ValueError(f"expected {self.count} bits, got {len(data)}")
            return [bool(data[i]) for i in self.bit_indexes]
        if len(data) != self.count:
            raise ValueError(f"expected {self.count} registers, got {len(data)}")
        big = self.pack_big.pack(*data) if self.pack_big is not None else b""
        little = self.pack_little.pack(*data) if self.pack_little is not None else b""
        return self._unpack(big, little)

    def decode_wire(self, wire: bytes) -> list[Value]:
        """The values of ``names`` from the register bytes as they came on the wire (each register
        big-endian, the Modbus spec): no list of registers is made when no point swaps bytes."""
        if len(wire) != 2 * self.count:
            raise ValueError(f"expected {self.count} registers, got {len(wire) / 2:g}")
        little = b""
        if self.pack_little is not None:
            little = self.pack_little.pack(*struct.unpack(f">{self.count}H", wire))
        return self._unpack(wire, little)

    def _unpack(self, big: bytes, little: bytes) -> list[Value]:
        values: list[Value] = []
        for run in self.runs:
            raw = run.unpack_from.unpack_from(little if run.swapped else big, run.byte_offset)
            if run.scales is None or run.offsets is None:
                values.extend(raw)
            else:
                values.extend([v * s + o for v, s, o in zip(raw, run.scales, run.offsets, strict=True)])
        return values


# --------------------------------------------------------------------------- the read plan


def build_plan(points: Iterable[ModbusPoint], max_registers: int = MAX_REGISTERS,
               max_gap: int = 0) -> tuple[Block, ...]:
    """Coalesce points into as few blocks as possible, table by table, in address order.

    A block holds at most ``max_registers`` registers (``MAX_BITS`` bits for coils and
    discrete inputs) and bridges gaps of at most ``max_gap`` unused registers or bits. A
    single point wider than ``max_registers`` still gets a block of its own width.
    """
    by_table: dict[str, list[ModbusPoint]] = {table: [] for table in (*REGISTER_TABLES, *BIT_TABLES)}
    for point in points:
        _check_point(point)
        by_table[point.register].append(point)
    blocks: list[Block] = []
    for table, members in by_table.items():
        limit = MAX_BITS if table in BIT_TABLES else min(max_registers, MAX_REGISTERS)
        for group in _group(sorted(members, key=lambda p: p.address), limit, max_gap):
            blocks.append(_block(table, group))
    return tuple(blocks)


def _check_point(point: ModbusPoint) -> None:
    if point.register not in (*REGISTER_TABLES, *BIT_TABLES):
        raise ValueError(f'point "{point.name}": unknown register table "{point.register}"')
    if (point.register in BIT_TABLES) != (point.type == "bool"):
        raise ValueError(f'point "{point.name}": type {point.type} does not fit '
                         f'register = "{point.register}"')
    if point.word_order not in ("big", "little"):
        raise ValueError(f'point "{point.name}": unknown word_order "{point.word_order}"')
    if point.byte_order not in ("big", "little"):
        raise ValueError(f'point "{point.name}": unknown byte_order "{point.byte_order}"')


def _group(points: list[ModbusPoint], limit: int, max_gap: int) -> list[list[ModbusPoint]]:
    """Split address-sorted points into runs that fit one request each."""
    groups: list[list[ModbusPoint]] = []
    start = end = 0
    for point in points:
        point_end = point.address + point.width
        if groups and point.address - end <= max_gap and max(end, point_end) - start <= limit:
            groups[-1].append(point)
            end = max(end, point_end)
        else:
            groups.append([point])
            start, end = point.address, point_end
    return groups


def _block(table: str, points: list[ModbusPoint]) -> Block:
    address = points[0].address
    count = max(p.address + p.width for p in points) - address
    if table in BIT_TABLES:
        return Block(table, address, count, tuple(p.name for p in points),
                     bit_indexes=tuple(p.address - address for p in points))
    grouped = _runs(points)
    runs = [_run(run, address) for run in grouped]
    swapped = any(run.swapped for run in runs)
    plain = not all(run.swapped for run in runs)
    return Block(
        table, address, count, tuple(p.name for run in grouped for p in run),
        runs=tuple(runs),
        pack_big=struct.Struct(f">{count}H") if plain else None,
        pack_little=struct.Struct(f"<{count}H") if swapped else None,
        may_be_nonfinite=any(map(_may_be_nonfinite, points)),
    )


def _runs(points: list[ModbusPoint]) -> list[list[ModbusPoint]]:
    """Adjacent points sharing type, word and byte order and whether they need scale/offset arithmetic."""
    runs: list[list[ModbusPoint]] = []
    for point in points:
        if runs and _run_key(runs[-1][-1]) == _run_key(point) and \
                runs[-1][-1].address + runs[-1][-1].width == point.address:
            runs[-1].append(point)
        else:
            runs.append([point])
    return runs


def _little_words(point: ModbusPoint) -> bool:
    return point.word_order == "little" and point.width > 1


def _little_bytes(point: ModbusPoint) -> bool:
    return point.byte_order == "little"


def _may_be_nonfinite(point: ModbusPoint) -> bool:
    # Integers scale to a finite float unless the scale (or offset) is absurdly large.
    return point.type in ("float32", "float64") or not math.isfinite(abs(point.scale) * 2.0**64 + abs(point.offset))


def _identity(point: ModbusPoint) -> bool:
    return point.scale == 1 and point.offset == 0


def _run_key(point: ModbusPoint) -> tuple[str, bool, bool, bool]:
    return point.type, _little_words(point), _little_bytes(point), _identity(point)


def _run(points: list[ModbusPoint], block_address: int) -> Run:
    first = points[0]
    little_words = _little_words(first)
    # See the module docstring's table: the struct byte order follows the word order, and the
    # registers are byte-swapped exactly when one of the two orders is little and the other big.
    fmt = f"{'<' if little_words else '>'}{len(points)}{STRUCT_CODES[first.type]}"
    identity = _identity(first)
    return Run(
        unpack_from=struct.Struct(fmt),
        swapped=little_words != _little_bytes(first),
        byte_offset=2 * (first.address - block_address),
        scales=None if identity else tuple(float(p.scale) for p in points),
        offsets=None if identity else tuple(float(p.offset) for p in points),
    )


# --------------------------------------------------------------------------- single values


def encode(point: ModbusPoint, value: object) -> list[int] | bool:
    """The registers (or the coil state) that make ``read`` return ``value`` for ``point``.

    Inverts the decoding exactly: ``raw = (value - offset) / scale``, integers rounded to the
    nearest and range-checked, floats packed as the point's type, words in its word order and
    the bytes of each register in its byte order.
    Raises ValueError for a value the point cannot hold (out of range, NaN, infinite, wrong kind).
    """
    if point.type == "bool":
        return _encode_bool(point, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number for {point.type} point \"{point.name}\", got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f'cannot write {value} to point "{point.name}"')
    raw = _raw(point, value)
    try:
        data = struct.pack(f">{STRUCT_CODES[point.type]}", raw)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f'{value!r} is out of range for {point.type} point "{point.name}"') from exc
    # Reading the big-endian bytes as "<H" registers swaps the two bytes of each register.
    registers = list(struct.unpack(f"{'<' if _little_bytes(point) else '>'}{point.width}H", data))
    return registers[::-1] if point.word_order == "little" else registers


def _encode_bool(point: ModbusPoint, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise ValueError(f'expected true/false or 0/1 for bool point "{point.name}", got {value!r}')


def _raw(point: ModbusPoint, value: int | float) -> int | float:
    """The raw number to pack: unscaled, rounded and range-checked for integer types."""
    if point.type in ("float32", "float64"):
        raw = (value - point.offset) / point.scale
        if not math.isfinite(raw):
            raise ValueError(f'{value!r} is out of range for {point.type} point "{point.name}"')
        return raw
    # An int with scale 1 and offset 0 skips the float detour: exact even beyond 2**53.
    exact = _identity(point) and isinstance(value, int)
    whole = value if exact else round((value - point.offset) / point.scale)
    low, high = INTEGER_RANGES[point.type]
    if not low <= whole <= high:
        raise ValueError(f'{value!r} is out of range for {point.type} point "{point.name}" '
                         f"(raw {whole}, allowed {low}..{high})")
    return whole


def exact(point: ModbusPoint, value: object) -> bool | int | float:
    """What ``read`` returns for ``point`` after ``value`` is written: ``encode``, then decode.

    Stricter than :func:`encode` about kinds: a bool point takes only ``True``/``False`` (not
    0/1), a numeric point only a real number (never a bool). Raises ValueError like ``encode``.
    """
    if point.type == "bool" and not isinstance(value, bool):
        raise ValueError(f'expected true or false for bool point "{point.name}", got {value!r}')
    payload = encode(point, value)
    if isinstance(payload, bool):
        return payload
    decoded = _single_block(point).decode(payload)[0]
    assert isinstance(decoded, int | float)  # register types decode to numbers
    return decoded


@functools.lru_cache(maxsize=4096)
def _single_block(point: ModbusPoint) -> Block:
    """A block holding only ``point``: decodes its registers exactly as a read of it would."""
    return _block(point.register, [point])


def resolution(point: ModbusPoint, value: float) -> float:
    """One raw step of ``point`` near ``value``, in engineering units (see ``Driver.resolution``)."""
    if point.type == "bool":
        return 1.0
    scale = abs(point.scale)
    if point.type == "float64":
        return math.ulp((value - point.offset) / point.scale) * scale
    if point.type == "float32":
        return float32_spacing((value - point.offset) / point.scale) * scale
    return scale

