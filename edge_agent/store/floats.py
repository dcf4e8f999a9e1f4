"""The JSON text of a device read's float values, made once for the twin and the cloud.

Turning a float into its shortest text (the digits ``repr`` writes: the shortest that read back
to the same float) was the costliest step a sample took on its way through the agent: about
0.8 us on a float32 register's value with ``repr``. orjson makes the same digits in Rust, about
0.1 us a value with the splitting (measured: bench/bench_history.py, bench/bench_plant.py), so
the texts come from it. Some small numbers are written another way (``0.00001`` and ``1.5e-7``
where ``repr`` writes ``1e-05`` and ``1.5e-07``): the same JSON numbers. The twin's history block
(:mod:`edge_agent.store.twin`) and the compact telemetry payload
(:mod:`edge_agent.cloud.payloads`) write the same values of the same device reads, a moment
apart. While a consumer is there (:func:`share`: the v2 telemetry is running), :func:`texts`
keeps the texts the twin made and :func:`take` hands each run's texts to the telemetry once,
forgetting them. A run is found by its values (a tuple: hashed and compared in C), so a hit is
always the right text; a miss only costs the formatting again.

Bounded: the texts of one twin flush wait, until the telemetry prepared that flush (:func:`taken`),
and never more than ``LIMIT_VALUES`` values (about 10 MB of texts). The twin and the telemetry
run in worker threads, so changes are made under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import orjson

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


def texts(values: tuple[Any, ...]) -> list[str] | None:
    """The JSON text of each value, when every one is a finite float; None otherwise (the caller
    encodes such runs its own way). Kept for :func:`take` while a consumer shares them."""
    made = make(values)
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
    return make(values)


def make(values: Sequence[Any]) -> list[str] | None:
    """The JSON text of each value when every one is a finite float, else None; nothing is kept."""
    if not values or not _FLOAT.issuperset(map(type, values)):
        return None
    joined = array(values)  # a list or a tuple of floats: one call for the run
    return None if joined is None else joined[1:-1].split(",")


def array(items: Sequence[Any]) -> str | None:
    """The JSON array of ``items`` (numbers, booleans, strings, or lists of them) in one orjson call;
    None when orjson would write ``null`` (NaN, an infinity, None: the caller writes them its own
    way; a string with ``null`` in it only sends the caller there too) or refuses an item (an
    integer past 64 bits, a string that is not UTF-8)."""
    try:
        joined = orjson.dumps(items)
    except TypeError:  # orjson.JSONEncodeError is one
        return None
    return None if b"null" in joined else joined.decode()


def one(value: float) -> str:
    """The JSON text of one finite float, as :func:`make` writes it."""
    return orjson.dumps(value).decode()


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


def taken() -> None:
    """The consumer has taken what it will of the texts kept so far: forget the rest.

    The twin writer calls this right after the telemetry prepared a flush. A run the telemetry
    grouped another way (two devices' reads with the same source timestamp are one run for it,
    two for the twin; a run split at ``max_samples``) is never taken; without this it would
    wait until ``LIMIT_VALUES`` pushed it out, and the texts of 100,000 values (about 9 MB) would
    stay in memory for good (measured: OPC UA, 20 x 500 @ 1 s, v2)."""
    with _lock:
        _forget()


def kept() -> int:
    """How many values' texts are waiting for a consumer."""
    return _kept


def clear() -> None:
    """Forget every text and every consumer (tests)."""
    global _consumers
    with _lock:
        _forget()
        _consumers = 0
