"""What a value is to the safety gate: its kind, the number it stands for, how it is shown, and how
close a read-back must come to count as the value written."""

from __future__ import annotations

import math
from typing import Any

from edge_agent.config import Bound, ModbusPoint, PointConfig


def kind_problem(point: PointConfig, value: Any) -> str | None:
    """Why ``value`` is the wrong kind for ``point`` (strings, booleans for numbers, numbers for booleans)."""
    boolean = isinstance(point, ModbusPoint) and point.type == "bool"
    if not isinstance(value, bool | int | float):
        return f"expected {'true or false' if boolean else 'a number'}, got {value!r}"
    if isinstance(point, ModbusPoint):
        if boolean and not isinstance(value, bool):
            return f'"{point.name}" is a bool point: expected true or false, got {value!r}'
        if not boolean and isinstance(value, bool):
            return f'"{point.name}" is a number ({point.type}): expected a number, got {str(value).lower()}'
    if number(value) is None:
        return f"{value!r} is not a finite number"
    return None


def shown_pair(asked: float, held: float) -> tuple[str, str]:
    """Two numbers shown so that they differ when they do (float32 rounding hides from ``:g``)."""
    for digits in (6, 9, 17):
        a, b = f"{asked:.{digits}g}", f"{held:.{digits}g}"
        if a != b or asked == held:
            return a, b
    return repr(asked), repr(held)


def number(value: Any) -> float | None:
    """``value`` as a finite float (booleans as 0/1), or None for anything else (strings, NaN, huge ints)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            return None
        return number if math.isfinite(number) else None
    return None


def tolerance(point: PointConfig, target: float, old: float) -> float:
    """How close the read-back must be to count as applied.

    At least the precision the value is stored with (a register's scale, float32's 7 digits),
    otherwise 0.1 % of the safe range, but never as much as half the step: a device that ignored
    a small write must not pass for one that took it.
    """
    precision = 1e-6 * max(1.0, abs(target))  # float32 and OPC UA Float
    if isinstance(point, ModbusPoint):
        if point.type == "float64":
            precision = 1e-12 * max(1.0, abs(target))
        elif point.type not in ("float32", "bool"):
            precision = abs(point.scale) / 2 + 1e-9
    allowance = 0.001 * abs((point.max or 0.0) - (point.min or 0.0))
    if target != old:
        allowance = min(allowance, abs(target - old) / 2)
    return max(precision, allowance)


def band(bound: Bound) -> str:
    low = "-inf" if bound.min is None else f"{bound.min:g}"
    high = "inf" if bound.max is None else f"{bound.max:g}"
    return f"{low}..{high}"
