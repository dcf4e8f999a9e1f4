"""Every reading of a run of Modbus registers: each type, in each byte and word order.

Pure (standard library only), so the driver can share it once points get a ``byte_order``.

Names, as in the config (``word_order``) and the probe's JSON:

- ``byte_order``: the order of the two bytes inside each 16-bit register. ``big`` is the Modbus
  spec's (high byte first); ``little`` swaps them.
- ``word_order``: the order of the registers of a 32- or 64-bit value. ``big`` puts the most
  significant register first (the driver's default); ``little`` puts it last.

With the bytes of a 32-bit value named A (most significant) to D, the four orders are the
field's usual ABCD (word big, byte big), CDAB (word little, byte big), BADC (word big, byte
little) and DCBA (word little, byte little). A 16-bit value has one word: its ``word_order`` is
reported as ``big``.

A decoding is *plausible* when it could be a measured value: integers of 16 bits always; 32-bit
integers below 1e9 in size and 64-bit ones below 1e15; floats when finite and either zero or
between 1e-6 and 1e9 in size (which rules out denormals, like the 7e-41 a float read in the wrong
word order often gives, and the huge numbers of the other wrong orders).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

ORDERS = ("big", "little")
WIDTHS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "int64": 4, "uint64": 4, "float64": 4}
_CODES = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f",
          "int64": "q", "uint64": "Q", "float64": "d"}
LABELS = {("big", "big"): "ABCD", ("little", "big"): "CDAB", ("big", "little"): "BADC",
          ("little", "little"): "DCBA"}  # (word_order, byte_order) -> the field's name for a 32-bit order

FLOAT_MIN = 1e-6
FLOAT_MAX = 1e9
INT32_MAX = 1e9
INT64_MAX = 1e15


@dataclass(frozen=True, slots=True)
class Decoding:
    """One way to read the registers from ``address``: a type in a word and byte order."""

    address: int
    type: str
    word_order: str
    byte_order: str
    value: int | float
    plausible: bool


def value_of(registers: Sequence[int], kind: str, word_order: str = "big", byte_order: str = "big") -> int | float:
    """The first ``WIDTHS[kind]`` registers read as ``kind`` in the given orders."""
    width = WIDTHS[kind]
    if len(registers) < width:
        raise ValueError(f"{kind} needs {width} registers, got {len(registers)}")
    words = list(registers[:width])
    for register in words:
        if not 0 <= register <= 0xFFFF:
            raise ValueError(f"a register holds 0..65535, got {register}")
    if word_order == "little":
        words.reverse()  # most significant first
    # "<NH" writes each register low byte first and keeps the registers' order: exactly undoing
    # a swap of the two bytes inside every register.
    data = struct.pack(f">{width}H" if byte_order == "big" else f"<{width}H", *words)
    value: int | float = struct.unpack(f">{_CODES[kind]}", data)[0]
    return value


def plausible(kind: str, value: float) -> bool:
    """Could ``value`` be a measurement? See the module's docstring for the rule."""
    if kind in ("int16", "uint16"):
        return True
    if kind in ("int32", "uint32"):
        return abs(value) < INT32_MAX
    if kind in ("int64", "uint64"):
        return abs(value) < INT64_MAX
    return math.isfinite(value) and (value == 0 or FLOAT_MIN <= abs(value) <= FLOAT_MAX)


def decode(registers: Sequence[int], start: int = 0) -> list[Decoding]:
    """Every decoding of ``registers`` (the first at address ``start``): per address, the 16-bit
    types in both byte orders, then the 32-bit types and the 64-bit types that fit, each in the four
    combinations of word and byte order."""
    out: list[Decoding] = []
    for offset in range(len(registers)):
        rest = registers[offset:]
        for kind, width in WIDTHS.items():
            if width > len(rest):
                continue
            word_orders = ORDERS if width > 1 else ("big",)
            for byte_order in ORDERS:
                for word_order in word_orders:
                    value = value_of(rest, kind, word_order, byte_order)
                    out.append(Decoding(start + offset, kind, word_order, byte_order, value, plausible(kind, value)))
    return out
