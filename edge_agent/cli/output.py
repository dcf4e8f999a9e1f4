"""Exit codes, and formatting for the terminal: numbers, times, tables, text that cannot drive the terminal.

Exit status: 0 success, 1 runtime failure, 2 bad config or bad usage, 3 (``status``) the agent
is not running.
"""

from __future__ import annotations

import time
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_NOT_RUNNING = 0, 1, 2, 3


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def table(headers: list[str], rows: list[list[str]]) -> list[int]:
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return widths


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences, carriage returns, bidi
    overrides) shown escaped. Names and messages in the twin may come from devices and from
    operators' commands; they must not drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
