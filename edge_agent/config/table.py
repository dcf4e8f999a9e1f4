"""Reading TOML tables with key-path problems instead of exceptions, and value parsers.

A :class:`Table` walks one table of the parsed document; every accessor records a problem
("devices[1].interval: expected a duration ...") and returns None instead of raising, so a
config with ten mistakes reports all ten at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "KiB": 1024,
               "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}

REQUIRED: Any = object()

# Upper bounds for every duration and size that names none of its own: finite, and far above any
# sane setting, so a typo ("7000d") or nan/inf from TOML is an error instead of a hung timer.
MAX_DURATION = "3650d"
MAX_SIZE = "1TiB"


def parse_duration(text: str) -> float:
    """Turn "250ms", "10s", "5m", "2h" or "7d" into seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(text)
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):  # "1e999" is no match, but 400 digits overflow to inf
        raise ValueError(text)
    return seconds


def parse_size(text: str) -> int:
    """Turn "512KiB", "256MB" or "1GiB" (or a bare byte count) into bytes; ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(text)
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not math.isfinite(size):
        raise ValueError(text)
    return int(size)


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``): a problem is one line, and a value
    from the file must not write to the operator's terminal or the journal as it likes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def finite_number(value: Any) -> bool:
    """A TOML number (not a boolean) that is a finite float: no nan, no inf, no 400-digit integer."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value).lower() if isinstance(value, bool) else repr(value)


class Table:
    """Reads one TOML table, recording problems with the key path instead of raising."""

    def __init__(self, raw: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.raw = raw
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.key(key)}: {text}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any, kinds: tuple[type, ...], expected: str) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if default is REQUIRED:
                self.problem(key, f"required, expected {expected}")
                return None
            return default
        value = self.raw[key]
        if isinstance(value, bool) and bool not in kinds:
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        if not isinstance(value, kinds):
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        return value

    def string(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default, (str,), "a string")
        if isinstance(value, str) and key in self.raw and not value.strip():
            self.problem(key, "expected a non-empty string")
            return None
        if isinstance(value, str) and "\x00" in value:  # no file name, host or name has one
            self.problem(key, "expected a string without NUL characters")
            return None
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any) -> Any:
        value = self.get(key, default, (str,), f"one of {', '.join(choices)}")
        if value is not None and value not in choices:
            self.problem(key, f'expected one of {", ".join(choices)}, got "{value}"')
            return None
        return value

    def number(self, key: str, default: Any = None, *, low: float | None = None,
               high: float | None = None, positive: bool = False) -> Any:
        value = self.get(key, default, (int, float), "a number")
        if value is None:
            return None
        try:
            value = float(value)
        except OverflowError:  # a TOML integer too large for a float
            self.problem(key, f"expected a finite number, got {_show(value)}")
            return None
        if not math.isfinite(value):
            self.problem(key, f"expected a finite number, got {value}")
            return None
        if positive and value <= 0:
            self.problem(key, f"expected a number above 0, got {value:g}")
            return None
        return self._bounded(key, value, low, high)

    def integer(self, key: str, default: Any = None, *, low: int | None = None,
                high: int | None = None) -> Any:
        value = self.get(key, default, (int,), "an integer")
        return None if value is None else self._bounded(key, value, low, high)

    def _bounded(self, key: str, value: Any, low: float | None, high: float | None) -> Any:
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"from {low:g} to {high:g}" if low is not None and high is not None else (
                f"at least {low:g}" if low is not None else f"at most {high:g}")
            shown = str(value) if isinstance(value, int) else f"{value:g}"  # a huge int has no float form
            self.problem(key, f"expected a number {span}, got {shown}")
            return None
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default, (bool,), "true or false")
        return default if value is None else bool(value)

    def duration(self, key: str, default: str | None, *, positive: bool = True, high: str = MAX_DURATION) -> Any:
        """A duration in seconds: "250ms", "10s", "5m", "2h", "7d" or a number; finite, at most ``high``."""
        self.seen.add(key)
        if key not in self.raw:
            if default is None:
                return None
            return parse_duration(default)
        value = self.raw[key]
        expected = 'a duration like "250ms", "10s", "5m", "2h" or "7d"'
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        try:
            seconds = parse_duration(value) if isinstance(value, str) else float(value)
        except (ValueError, OverflowError):  # float() of a 400-digit TOML integer overflows
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        if not math.isfinite(seconds):
            self.problem(key, f"expected a finite duration, got {_show(value)}")
            return None
        if positive and seconds <= 0:
            self.problem(key, f"expected a duration above 0, got {_show(value)}")
            return None
        if seconds < 0:
            self.problem(key, f"expected a duration of 0 or more, got {_show(value)}")
            return None
        if seconds > parse_duration(high):
            self.problem(key, f"expected a duration of at most {high}, got {_show(value)}")
            return None
        return seconds

    def size(self, key: str, default: str, *, high: str = MAX_SIZE) -> Any:
        """A byte size: "64MiB", "1GB", "512KiB" or a bare number of bytes; at most ``high``."""
        self.seen.add(key)
        value = self.raw.get(key, default)
        expected = 'a size like "512KiB", "64MiB" or "1GB"'
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        try:
            size = parse_size(value) if isinstance(value, str) else int(value)
        except ValueError:
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        if size <= 0:
            self.problem(key, f"expected a size above 0, got {_show(value)}")
            return None
        if size > parse_size(high):
            self.problem(key, f"expected a size of at most {high}, got {_show(value)}")
            return None
        return size

    def table(self, key: str) -> Table:
        value = self.get(key, {}, (dict,), "a table")
        return Table(value or {}, self.key(key), self.problems)

    def tables(self, key: str) -> list[Table]:
        value = self.get(key, [], (list,), "an array of tables")
        out = []
        for index, item in enumerate(value or []):
            path = f"{self.key(key)}[{index}]"
            if not isinstance(item, dict):
                self.problems.append(f"{path}: expected a table, got {_show(item)}")
                continue
            out.append(Table(item, path, self.problems))
        return out

    def finish(self, *, allow: Iterable[str] = ()) -> None:
        """Report every key that was not read as unknown."""
        allowed = set(allow)
        for key in self.raw:
            if key not in self.seen and key not in allowed:
                self.problem(key, "unknown key")
