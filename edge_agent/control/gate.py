"""The safety gate: the only way anything is written to a device.

Every source (operator command, cloud, optimiser, rollback) asks :meth:`SafetyGate.request`.
Requests go into one queue and one reconciler task applies them in order, so two writes to a
plant never race. For each request, in order:

1. the point exists and is ``writable = true``; the value has the point's kind (true/false for
   a boolean point, a finite number, never a boolean or a string, for a numeric one) and is
   inside ``min..max``;
2. the point's own reading is good and fresh (and so are the inputs the optimiser used);
3. automatic writes (optimiser, cloud) only: the point is not held after an operator override
   (:mod:`edge_agent.control.overrides`); at least ``min_interval`` has passed since the last
   write to the point (remembered across restarts); no anomaly is active on the point's
   equipment (``[gate] block_on_anomaly``). Operator writes skip the hold, not the rest;
4. the exact value: the driver says what the device will hold after the write (scale and
   offset inverted, integer rounding, float32 rounding, the OPC UA node's own type). That value
   is what is checked and written: it must be within half a raw step of the request (else the
   request is refused, naming both), inside ``min..max``, and at most ``max_step`` from the
   reported value (or, with ``[gate] ramp = true``, the write is one ``max_step`` towards the
   request and that step is what must be inside ``min..max``);
5. the driver writes it, then the point is read back until the device reports it within a
   tolerance and still does after a settle time. A write not confirmed within
   ``readback_timeout`` is undone: the previous value is written back and confirmed, the result
   is ``failed`` ("restored to X", or an event saying the restore failed too) and the optimiser
   drops to advise mode.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from drivers.base import GOOD, Driver, Reading, Value, source_age
from edge_agent.config import AgentConfig, PointConfig
from edge_agent.control.overrides import AUTOMATIC_SOURCES, Hold, OverrideWatch
from edge_agent.control.values import band, kind_problem, number, shown_pair, tolerance
from edge_agent.errors import DriverError
from edge_agent.tasks import wait_event

log = logging.getLogger(__name__)

APPLIED, REJECTED, FAILED, ROLLED_BACK = "applied", "rejected", "failed", "rolled_back"
SOURCES = ("operator", "cloud", "optimizer", "rollback", "local", "sparkplug")
TICK = 0.25  # seconds between looks at overrides, holds and watches while no request comes


@dataclass(frozen=True)
class WriteResult:
    """The gate's verdict on one request."""

    ts: float
    source: str
    actor: str | None
    point: str
    old: float | None  # the reported value before the write
    requested: float | None
    written: float | None  # what reached the device (ramp step, rounding); None when refused before writing
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
    previous: Value  # the reported value before the automatic write, as the device gave it
    equipment: str
    until: float


class SafetyGate:
    """Checks, applies, verifies and records every write; rolls automatic writes back when needed."""

    def __init__(self, config: AgentConfig, latest: Callable[[str], Reading | None],
                 driver_for: Callable[[str], Driver | None], anomalies: Callable[[str], list[str]],
                 record: Callable[[WriteResult], Any], submit: Callable[[Sequence[Reading]], None],
                 on_rollback: Callable[[str], None] = lambda reason: None,
                 age: Callable[[str, Reading], float] | None = None,
                 on_event: Callable[[dict[str, Any]], None] = lambda event: None) -> None:
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
        self._writable = {name: entry for name, entry in self.points.items() if entry[1].writable}
        self.last_write: dict[str, float] = {}
        self.watches: dict[str, _Watch] = {}
        self.overrides = OverrideWatch(config.gate.override_hold, on_event, self._resolution)
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=100)
        self._arrived = asyncio.Event()  # set by request() after it queued one

    def update(self, config: AgentConfig) -> None:
        """Take a reloaded config (new limits apply to the next request)."""
        self.config = config
        self.points = {p.name: (d.name, p) for d, p in config.points()}
        self._writable = {name: entry for name, entry in self.points.items() if entry[1].writable}
        self._arrived.set()  # a waiting reconciler looks again (it may have writable points to watch now)
        self.overrides.hold = config.gate.override_hold

    def remember(self, last_writes: Mapping[str, float], override_events: Iterable[Mapping[str, Any]],
                 restored: Mapping[str, Reading]) -> None:
        """What the gate knew before a restart: each point's last write (for ``min_interval``), the
        override holds still in force, and the readings restored from the twin (not device news)."""
        for point, ts in last_writes.items():
            self.last_write[point] = max(ts, self.last_write.get(point, -math.inf))
        self.overrides.restore(override_events)
        self.overrides.ignore(restored)

    def held(self, point: str) -> Hold | None:
        """The override hold on ``point``, when automatic writes to it are paused."""
        return self.overrides.held(point)

    def holds(self) -> list[Hold]:
        """Every hold in force."""
        self.overrides.expire()
        return list(self.overrides.holds.values())

    def acknowledged(self, event_id: int, operator: str) -> list[str]:
        """An operator acknowledged an event: lift the hold it set (returns the points released)."""
        return self.overrides.release(event_id, operator)

    # ------------------------------------------------------------------ the public door

    async def request(self, point: str, value: Any, *, source: str, actor: str | None = None,
                      inputs: Sequence[str] = (), watch: bool = False) -> WriteResult:
        """Ask for ``point`` = ``value``; returns once the write is applied, refused or failed."""
        done: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(point, value, source, actor, tuple(inputs), watch, done))
        self._arrived.set()
        return await done

    async def run(self) -> None:
        """The reconciler: applies queued requests one at a time; notices overrides; watches automatic writes."""
        while True:
            if self._queue.empty():
                if self._writable or self.watches or self.overrides.holds:
                    # a timer ends the wait, not a cancellation: the gate ticks four times a second
                    await wait_event(self._arrived, TICK)
                else:  # nothing to watch: no wake-ups until a request (or a reload) comes
                    await self._arrived.wait()
                self._arrived.clear()
            try:
                req = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                await self._tick()
                continue
            self._notice_overrides()  # an HMI change just before this request must hold it
            try:
                result = await self._apply(req)
            except Exception as exc:  # a bug must not leave the requester waiting forever
                log.exception("gate: unexpected error applying %s", req.point)
                result = self._verdict(req, None, None, None, FAILED, f"internal error: {exc!r}")
            if not req.done.done():
                req.done.set_result(result)
            await self._tick()

    async def _tick(self) -> None:
        self._notice_overrides()
        self.overrides.expire()
        await self._check_watches()

    def _notice_overrides(self) -> None:
        for hold in self.overrides.check(self._writable, self.latest):
            if self.watches.pop(hold.point, None) is not None:
                log.warning("gate: no rollback of %s: an operator changed it at the device", hold.point)

    def _resolution(self, point: str, value: float) -> float:
        device = self.points.get(point, ("", None))[0]
        driver = self.driver_for(device)
        return driver.resolution(point, value) if driver is not None else 0.0

    # ------------------------------------------------------------------ checks

    def _result(self, req: _Request, old: float | None, written: float | None, readback: float | None,
                result: str, reason: str, requested: float | None = None) -> WriteResult:
        value = requested if requested is not None else number(req.value)
        verdict = WriteResult(time.time(), req.source, req.actor, req.point, old, value, written, readback,
                              result, reason)
        level = logging.INFO if result in (APPLIED, ROLLED_BACK) else logging.WARNING
        log.log(level, "gate: %s write %s = %s from %s%s: %s%s", result, req.point, value, req.source,
                f" ({req.actor})" if req.actor else "", reason or "ok",
                f" (read back {readback})" if readback is not None else "")
        return verdict

    def _verdict(self, req: _Request, old: float | None, written: float | None, readback: float | None,
                 result: str, reason: str, requested: float | None = None) -> WriteResult:
        verdict = self._result(req, old, written, readback, result, reason, requested)
        self.record(verdict)
        return verdict

    def _refusal(self, req: _Request, point: PointConfig | None, reported: Reading | None) -> str | None:
        """Why the request may not be written, or None. Cheap checks first; the exact value is checked later."""
        if point is None:
            return f'no point named "{req.point}"'
        if not point.writable:
            return f'"{req.point}" is not writable (writable = true is not set)'
        problem = kind_problem(point, req.value)
        if problem is not None:
            return problem
        value = float(req.value)
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
        if req.source in AUTOMATIC_SOURCES:
            hold = self.overrides.held(req.point)
            if hold is not None:
                return f"{req.point} is {hold.reason()}"
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
        if number(reading.value) is None:
            return f"not a number ({reading.value!r})"
        return None

    async def _plan(self, req: _Request, point: PointConfig, driver: Driver,
                    old: float) -> tuple[bool | int | float, str] | str:
        """The exact value to write and a note, or why it may not be written.

        The driver computes what the device will hold; range and step are checked on that.
        """
        wanted: Any = req.value
        number = float(wanted)
        note = ""
        ramping = (self.config.gate.ramp and point.max_step is not None and req.source != "rollback"
                   and abs(number - old) > point.max_step + 1e-9)
        if ramping:
            assert point.max_step is not None
            wanted = old + math.copysign(point.max_step, number - old)
            note = f"ramping: one max_step towards {number:g}"
        try:
            exact = await driver.exact(req.point, wanted)
        except DriverError as exc:
            return f"cannot be written: {exc.reason}"
        written, target = float(exact), float(wanted)
        asked, held = shown_pair(target, written)
        slack = 1e-9 * max(1.0, abs(target))
        if abs(written - target) > driver.resolution(req.point, target) / 2 + slack:
            return f"{asked} cannot be written exactly: the device would hold {held}, more than half a raw step away"
        shown = asked if written == target else f"{asked} (the device would hold {held})"
        assert point.min is not None and point.max is not None
        if not point.min <= written <= point.max:
            where = f"ramping towards {number:g}: the next step {shown}" if ramping else shown
            return f"{where} is outside the safe range {point.min:g}..{point.max:g}"
        if point.max_step is not None and abs(written - old) > point.max_step + slack and req.source != "rollback":
            detail = "" if written == target else f" ({asked} would be written as {held})"
            return f"step {written - old:+g} is larger than max_step {point.max_step:g}{detail}"
        return exact, note

    # ------------------------------------------------------------------ applying

    async def _apply(self, req: _Request) -> WriteResult:
        device, point = self.points.get(req.point, ("", None))
        reported = self.latest(req.point)
        old = number(reported.value) if reported else None
        refusal = self._refusal(req, point, reported)
        if refusal is not None or point is None or old is None or reported is None:
            return self._verdict(req, old, None, None, REJECTED, refusal or "no reported value")
        driver = self.driver_for(device)
        if driver is None:
            return self._verdict(req, old, None, None, FAILED, f"device {device} is not connected")
        planned = await self._plan(req, point, driver, old)
        if isinstance(planned, str):
            return self._verdict(req, old, None, None, REJECTED, planned)
        exact, note = planned
        target = float(exact)
        grace = self.config.gate.readback_timeout
        try:
            await driver.write(req.point, exact)
        except DriverError as exc:
            self.overrides.wrote(req.point, None, (old,), grace=grace)
            return self._verdict(req, old, target, None, FAILED, str(exc))
        self.last_write[req.point] = time.time()
        allowed = tolerance(point, target, old)
        readback = await self._read_back(driver, point, target, allowed, self.config.gate.readback_timeout)
        if readback is None or abs(readback - target) > allowed:
            shown = "nothing" if readback is None else f"{readback:g}"
            reason = (f"read-back: the device reports {shown}, expected {target:g} within "
                      f"{self.config.gate.readback_timeout:g} s")
            if req.source == "rollback":
                self.overrides.wrote(req.point, None, (old, target), grace=grace)
                return self._verdict(req, old, target, readback, FAILED, reason)
            outcome, undo = await self._undo(req, point, driver, reported.value, old, target, readback)
            verdict = self._verdict(req, old, target, readback, FAILED, f"{reason}; {outcome}")
            self.record(undo)  # after the verdict: the desired state ends on the restored value
            return verdict
        self.overrides.wrote(req.point, readback, (old,), grace=grace)
        if req.watch:
            self.watches[req.point] = _Watch(req.point, reported.value, device, time.time() + self.config.gate.watch)
        result = ROLLED_BACK if req.source == "rollback" else APPLIED
        return self._verdict(req, old, target, readback, result, req.why or note, requested=float(req.value))

    async def _undo(self, req: _Request, point: PointConfig, driver: Driver, previous: Value, old: float,
                    target: float, seen: float | None) -> tuple[str, WriteResult]:
        """Write ``previous`` (= ``old``, as the device reported it) back after an unconfirmed write and
        confirm it; returns the outcome and its audit row.

        A device that did not confirm in time is slow by evidence: its restore gets twice as long.
        """
        readback: float | None = None
        try:
            await driver.write(req.point, previous)
        except DriverError as exc:
            outcome = f"restoring {old:g} failed too: {exc}"
        else:
            self.last_write[req.point] = time.time()
            allowed = tolerance(point, old, seen if seen is not None else target)
            readback = await self._read_back(driver, point, old, allowed, 2 * self.config.gate.readback_timeout)
            confirmed = readback is not None and abs(readback - old) <= allowed
            shown = "nothing" if readback is None else f"{readback:g}"
            outcome = (f"restored to {old:g}" if confirmed
                       else f"restoring {old:g} failed too: the device reports {shown}")
        restored = outcome.startswith("restored")
        self.overrides.wrote(req.point, old if restored else None, (old,),
                             grace=self.config.gate.readback_timeout)
        level = logging.WARNING if restored else logging.ERROR
        log.log(level, "gate: %s: the write of %g was not confirmed; %s", req.point, target, outcome)
        self.on_rollback(f"{req.point}: the write of {target:g} ({req.source}) was not confirmed; {outcome}")
        rollback = replace(req, source="rollback", actor=None, value=previous)
        row = self._result(rollback, seen, old, readback, ROLLED_BACK if restored else FAILED,
                           f"undoing the unconfirmed write of {target:g} ({req.source})")
        return outcome, row

    async def _read_back(self, driver: Driver, point: PointConfig, target: float, tolerance: float,
                         timeout: float) -> float | None:
        """Read until the device reports ``target`` and still does after a settle time, or time runs out.

        One matching read is not enough: a controller that rejects a setpoint may revert it on its
        next scan, after the first read-back already saw the written value.
        """
        deadline = time.monotonic() + timeout
        settle = min(self.config.gate.readback_timeout / 2, 1.0)
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
                    seen = number(r.value)
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
            previous = number(watch.previous)
            log.warning("gate: rolling back %s to %s: %s", name, watch.previous, reason)
            done: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
            result = await self._apply(_Request(name, watch.previous, "rollback", None, (), False, done, reason))
            shown = f"{previous:g}" if previous is not None else repr(watch.previous)
            self.on_rollback(f"{name} restored to {shown} ({result.result}): {reason}")

    def _watch_trips(self, watch: _Watch) -> str | None:
        active = self.anomalies(watch.equipment)
        if active:
            return f"anomaly raised on {watch.equipment} ({', '.join(active)}) after the write"
        optimizer = self.config.optimizer
        for guard in optimizer.guards if optimizer else ():
            reading = self.latest(guard.name)
            value = number(reading.value) if reading else None
            if value is not None and not guard.holds(value):
                return f"guarded point {guard.name} = {value:g} left its band {band(guard)}"
        return None
