"""The JSON text of a device read's float values, made once for the twin and the cloud.

Turning a float into its shortest text (``repr``, what the JSON encoder writes) is the costliest
step a sample takes on its way through the agent: about 0.7 us on a float32 register's value,
most of what a history block or a telemetry payload costs. The twin's history block
(:mod:`edge_agent.store.twin`) and the compact telemetry payload
(:mod:`edge_agent.cloud.payloads`) write the same values of the same device reads, a moment
apart, so :func:`texts` keeps the texts of the most recent runs: the twin pays for them and the
telemetry finds them. A run is looked up by its values (a tuple: hashed and compared in C), so a
hit is always the right text, whatever order the callers come in; a miss only costs the
formatting again.

Bounded: at most ``LIMIT_VALUES`` values (about 8 MB of texts). The twin and the telemetry run in
worker threads, so changes are made under a lock.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

LIMIT_VALUES = 100_000  # values whose texts are kept (the newest runs)

_FLOAT = frozenset({float})  # not a subclass: its repr may differ
_cache: dict[tuple[float, ...], list[str]] = {}
_kept = 0
_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _template(count: int) -> str:
    return ",".join(("%r",) * count)


def texts(values: tuple[Any, ...]) -> list[str] | None:
    """The JSON text of each value, when every one is a finite float; None otherwise (the caller
    encodes such runs its own way)."""
    found = _cache.get(values)
    if found is not None:
        return found
    if not values or not _FLOAT.issuperset(map(type, values)):
        return None
    joined = _template(len(values)) % values  # one C call for the run
    if "n" in joined:  # nan, inf: not JSON (a finite float's repr has digits, ".", "e", "-", "+" only)
        return None
    made = joined.split(",")
    _keep(values, made)
    return made


def _keep(values: tuple[float, ...], made: list[str]) -> None:
    global _kept
    with _lock:
        if values in _cache:
            return
        _cache[values] = made
        _kept += len(values)
        while _kept > LIMIT_VALUES and _cache:
            oldest = next(iter(_cache))
            _kept -= len(_cache.pop(oldest))


def clear() -> None:
    """Forget every text (tests)."""
    global _kept
    with _lock:
        _cache.clear()
        _kept = 0
