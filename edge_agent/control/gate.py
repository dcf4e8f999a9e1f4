"""The safety gate: the only way anything is written to a device.

Every source (operator command, cloud, optimiser, rollback) asks :meth:`SafetyGate.request`.
Requests go into one queue and one reconciler task applies them in order, so two writes to a
plant never race. For each request, in order:

1. the point exists, is ``writable = true`` and the value is a finite number inside ``min..max``;
2. the point's own reading is good and fresh (and so are the inputs the optimiser used);
3. the step from the reported value is at most ``max_step`` (or, with ``[gate] ramp = true``, the
   write moves one ``max_step`` towards the request);
4. at least ``min_interval`` has passed since the last write to the point;
5. no anomaly is active on the point's equipment (``[gate] block_on_anomaly``);
6. the driver writes it (encoded exactly as it is read), then the point is read back until the
   device reports the new value within a tolerance, or ``readback_timeout`` passes (failed).

Every attempt, refused or not, goes to the twin's ``writes`` table and the point's ``desired``
row, and out as an event. After an automatic write the gate watches the equipment for
``[gate] watch``: an anomaly or a guarded point leaving its band restores the previous value (a
rollback skips the interval and anomaly checks, which would otherwise block it) and tells the
optimiser to drop to advise mode.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from drivers.base import GOOD, Driver, Reading, source_age
from edge_agent.config import AgentConfig, Bound, ModbusPoint, PointConfig
from edge_agent.errors import DriverError

log = logging.getLogger(__name__)

APPLIED, REJECTED, FAILED, ROLLED_BACK = "applied", "rejected", "failed", "rolled_back"
SOURCES = ("operator", "cloud", "optimizer", "rollback", "local", "sparkplug")


@dataclass(frozen=True)
class WriteResult:
    """The gate's verdict on one request."""

    ts: float
    source: str
    actor: str | None
    point: str
    old: float | None  # the reported value before the write
    requested: float | None
    written: float | None  # what was sent (differs from requested when ramping); None when refused
    readback: float | None
    result: str  # applied | rejected | failed | rolled_back
    reason: str

    @property
    def ok(self) -> bool:
        return self.result == APPLIED

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Request:
    point: str
    value: Any
    source: str
    actor: str | None
    inputs: Sequence[str]
    watch: bool
    done: asyncio.Future[WriteResult]
    why: str = ""  # a rollback's cause, recorded as its reason


@dataclass
class _Watch:
    point: str
    previous: float
    equipment: str
    until: float


class SafetyGate:
    """Checks, applies, verifies and records every write; rolls automatic writes back when needed."""

    def __init__(self, config: AgentConfig, latest: Callable[[str], Reading | None],
                 driver_for: Callable[[str], Driver | None], anomalies: Callable[[str], list[str]],
                 record: Callable[[WriteResult], Any], submit: Callable[[Sequence[Reading]], None],
                 on_rollback: Callable[[str], None] = lambda reason: None,
                 age: Callable[[str, Reading], float] | None = None) -> None:
        self.config = config
        self.latest = latest
        # how old a reading is; the agent knows better than the timestamp for subscribed points
        # (an unchanged value is not stale while the subscription is alive)
        self.age = age or source_age
        self.driver_for = driver_for
        self.anomalies = anomalies
        self.record = record
        self.submit = submit
        self.on_rollback = on_rollback
        self.points: dict[str, tuple[str, PointConfig]] = {p.name: (d.name, p) for d, p in config.points()}
        self.last_write: dict[str, float] = {}
        self.watches: dict[str, _Watch] = {}
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=100)

    def update(self, config: AgentConfig) -> None:
        """Take a reloaded config (new limits apply to the next request)."""
        self.config = config
        self.points = {p.name: (d.name, p) for d, p in config.points()}

    # ------------------------------------------------------------------ the public door

    async def request(self, point: str, value: Any, *, source: str, actor: str | None = None,
                      inputs: Sequence[str] = (), watch: bool = False) -> WriteResult:
        """Ask for ``point`` = ``value``; returns once the write is applied, refused or failed."""
        done: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(point, value, source, actor, tuple(inputs), watch, done))
        return await done

    async def run(self) -> None:
        """The reconciler: applies queued requests one at a time and watches automatic writes."""
        while True:
            try:
                async with asyncio.timeout(1.0):
                    req = await self._queue.get()
            except TimeoutError:
                await self._check_watches()
                continue
            try:
                result = await self._apply(req)
            except Exception as exc:  # a bug must not leave the requester waiting forever
                log.exception("gate: unexpected error applying %s", req.point)
                result = self._verdict(req, None, None, None, FAILED, f"internal error: {exc!r}")
            if not req.done.done():
                req.done.set_result(result)
            await self._check_watches()

    # ------------------------------------------------------------------ checks

    def _verdict(self, req: _Request, old: float | None, written: float | None, readback: float | None,
                 result: str, reason: str, requested: float | None = None) -> WriteResult:
        value = requested if requested is not None else _number(req.value)
        verdict = WriteResult(time.time(), req.source, req.actor, req.point, old, value, written, readback,
                              result, reason)
        level = logging.INFO if result == APPLIED else logging.WARNING
        log.log(level, "gate: %s write %s = %s from %s%s: %s%s", result, req.point, value, req.source,
                f" ({req.actor})" if req.actor else "", reason or "ok",
                f" (read back {readback})" if readback is not None else "")
        self.record(verdict)
        return verdict

    def _refusal(self, req: _Request, point: PointConfig | None, value: float | None,
                 reported: Reading | None) -> str | None:
        """Why the request may not be written, or None. Cheap checks first."""
        if point is None:
            return f'no point named "{req.point}"'
        if not point.writable:
            return f'"{req.point}" is not writable (writable = true is not set)'
        if value is None:
            return f"{req.value!r} is not a finite number"
        assert point.min is not None and point.max is not None  # config validation guarantees it
        if not point.min <= value <= point.max:
            return f"{value:g} is outside the safe range {point.min:g}..{point.max:g}"
        stale = self._untrusted(req.point, reported)
        if stale:
            return f"the point's data is {stale}"
        for name in req.inputs:
            stale = self._untrusted(name, self.latest(name))
            if stale:
                return f"model input {name} is {stale}"
        if req.source == "rollback":
            return None
        since = time.time() - self.last_write.get(req.point, -math.inf)
        if since < point.min_interval:
            return f"too soon: the last write was {since:.0f} s ago, min_interval is {point.min_interval:g} s"
        if self.config.gate.block_on_anomaly:
            equipment = self.points[req.point][0]
            active = self.anomalies(equipment)
            if active:
                return f"an anomaly is active on {equipment} ({', '.join(active)})"
        return None

    def _untrusted(self, name: str, reading: Reading | None) -> str | None:
        if reading is None or reading.value is None:
            return "missing (no reading yet)"
        if reading.quality != GOOD:
            return reading.quality
        age = self.age(name, reading)
        if age > self.config.gate.max_input_age:
            return f"stale ({age:.0f} s old)"
        return None

    # ------------------------------------------------------------------ applying

    async def _apply(self, req: _Request) -> WriteResult:
        device, point = self.points.get(req.point, ("", None))
        value = _number(req.value)
        reported = self.latest(req.point)
        old = _number(reported.value) if reported else None
        refusal = self._refusal(req, point, value, reported)
        if refusal is not None or point is None or value is None or old is None:
            return self._verdict(req, old, None, None, REJECTED, refusal or "no reported value")
        target, note = value, ""
        if point.max_step is not None and abs(value - old) > point.max_step + 1e-9 and req.source != "rollback":
            if not self.config.gate.ramp:
                return self._verdict(req, old, None, None, REJECTED,
                                     f"step {value - old:+g} is larger than max_step {point.max_step:g}")
            target = old + math.copysign(point.max_step, value - old)
            note = f"ramping: one max_step towards {value:g}"
        driver = self.driver_for(device)
        if driver is None:
            return self._verdict(req, old, None, None, FAILED, f"device {device} is not connected")
        try:
            await driver.write(req.point, target)
        except DriverError as exc:
            return self._verdict(req, old, target, None, FAILED, str(exc))
        self.last_write[req.point] = time.time()
        tolerance = _tolerance(point, target, old)
        readback = await self._read_back(driver, point, target, tolerance)
        if readback is None or abs(readback - target) > tolerance:
            shown = "nothing" if readback is None else f"{readback:g}"
            return self._verdict(req, old, target, readback, FAILED,
                                 f"read-back: the device reports {shown}, expected {target:g} within "
                                 f"{self.config.gate.readback_timeout:g} s")
        if req.watch:
            self.watches[req.point] = _Watch(req.point, old, device, time.time() + self.config.gate.watch)
        result = ROLLED_BACK if req.source == "rollback" else APPLIED
        return self._verdict(req, old, target, readback, result, req.why or note, requested=value)

    async def _read_back(self, driver: Driver, point: PointConfig, target: float, tolerance: float) -> float | None:
        """Read until the device reports ``target`` and still does after a settle time, or time runs out.

        One matching read is not enough: a controller that rejects a setpoint may revert it on its
        next scan, after the first read-back already saw the written value.
        """
        timeout = self.config.gate.readback_timeout
        deadline = time.monotonic() + timeout
        settle = min(timeout / 2, 1.0)
        matched_at: float | None = None
        seen: float | None = None
        while True:
            try:
                readings = await driver.read()
            except DriverError as exc:
                log.debug("gate: read-back of %s failed: %s", point.name, exc)
                readings = []
            self.submit(readings)
            for r in readings:
                if r.point == point.name and r.quality == GOOD:
                    seen = _number(r.value)
            if seen is not None and abs(seen - target) <= tolerance:
                matched_at = matched_at or time.monotonic()
                if time.monotonic() - matched_at >= settle:
                    return seen
            else:
                matched_at = None
            if time.monotonic() >= deadline:
                return seen
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ watching

    async def _check_watches(self) -> None:
        now = time.time()
        for name, watch in list(self.watches.items()):
            if now > watch.until:
                del self.watches[name]
                continue
            reason = self._watch_trips(watch)
            if reason is None:
                continue
            del self.watches[name]
            log.warning("gate: rolling back %s to %g: %s", name, watch.previous, reason)
            done: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
            result = await self._apply(_Request(name, watch.previous, "rollback", None, (), False, done, reason))
            self.on_rollback(f"{name} restored to {watch.previous:g} ({result.result}): {reason}")

    def _watch_trips(self, watch: _Watch) -> str | None:
        active = self.anomalies(watch.equipment)
        if active:
            return f"anomaly raised on {watch.equipment} ({', '.join(active)}) after the write"
        optimizer = self.config.optimizer
        for guard in optimizer.guards if optimizer else ():
            reading = self.latest(guard.name)
            value = _number(reading.value) if reading else None
            if value is not None and not guard.holds(value):
                return f"guarded point {guard.name} = {value:g} left its band {_band(guard)}"
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            return None
        return number if math.isfinite(number) else None
    return None


def _tolerance(point: PointConfig, target: float, old: float) -> float:
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


def _band(bound: Bound) -> str:
    low = "-inf" if bound.min is None else f"{bound.min:g}"
    high = "inf" if bound.max is None else f"{bound.max:g}"
    return f"{low}..{high}"
