"""The JSON text of a device read's float values, made once for the twin and the cloud.

Turning a float into its shortest text (``repr``, what the JSON encoder writes) is the costliest
step a sample takes on its way through the agent: about 0.7 us on a float32 register's value,
most of what a history block or a telemetry payload costs. The twin's history block
(:mod:`edge_agent.store.twin`) and the compact telemetry payload
(:mod:`edge_agent.cloud.payloads`) write the same values of the same device reads, a moment
apart. While a consumer is there (:func:`share`: the v2 telemetry is running), :func:`texts`
keeps the texts the twin made and :func:`take` hands each run's texts to the telemetry once,
forgetting them. A run is found by its values (a tuple: hashed and compared in C), so a hit is
always the right text; a miss only costs the formatting again.

Bounded: at most ``LIMIT_VALUES`` values wait (about 10 MB of texts; only while the telemetry
lags that far behind the twin). The twin and the telemetry run in worker threads, so changes
are made under a lock.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

LIMIT_VALUES = 100_000  # values whose texts are kept (the newest runs)

_FLOAT = frozenset({float})  # not a subclass: its repr may differ
_cache: dict[tuple[float, ...], list[str]] = {}
_kept = 0
_consumers = 0  # running consumers (see share); texts are kept only while there is one
_lock = threading.Lock()


def share(on: bool) -> None:
    """A consumer of the twin's texts starts (True) or stops (False); with none, nothing is kept."""
    global _consumers
    with _lock:
        _consumers = max(0, _consumers + (1 if on else -1))
        if not _consumers:
            _forget()


@functools.lru_cache(maxsize=256)
def _template(count: int) -> str:
    return ",".join(("%r",) * count)


def texts(values: tuple[Any, ...]) -> list[str] | None:
    """The JSON text of each value, when every one is a finite float; None otherwise (the caller
    encodes such runs its own way). Kept for :func:`take` while a consumer shares them."""
    made = _make(values)
    if made is not None and _consumers:
        _keep(values, made)
    return made


def take(values: tuple[Any, ...]) -> list[str] | None:
    """Like :func:`texts`, taking the texts the twin made for ``values`` when they are kept."""
    if _cache:
        with _lock:
            found = _cache.pop(values, None)
            if found is not None:
                _drop(len(found))
                return found
    return _make(values)


def _make(values: tuple[Any, ...]) -> list[str] | None:
    if not values or not _FLOAT.issuperset(map(type, values)):
        return None
    joined = _template(len(values)) % values  # one C call for the run
    if "n" in joined:  # nan, inf: not JSON (a finite float's repr has digits, ".", "e", "-", "+" only)
        return None
    return joined.split(",")


def _keep(values: tuple[float, ...], made: list[str]) -> None:
    global _kept
    with _lock:
        if _cache.setdefault(values, made) is not made:  # the same run is waiting already
            return
        _kept += len(values)
        while _kept > LIMIT_VALUES and _cache:
            _drop(len(_cache.pop(next(iter(_cache)))))


def _drop(count: int) -> None:
    global _kept
    _kept -= count


def _forget() -> None:
    global _kept
    _cache.clear()
    _kept = 0


def kept() -> int:
    """How many values' texts are waiting for a consumer."""
    return _kept


def clear() -> None:
    """Forget every text and every consumer (tests)."""
    global _consumers
    with _lock:
        _forget()
        _consumers = 0
