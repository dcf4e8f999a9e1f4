"""Operator overrides: a writable point that changed at the device without the safety gate writing it.

An operator at the HMI, a local panel or another SCADA client may change a setpoint the agent
also writes. :class:`OverrideWatch` notices it: every writable point's live value is compared
with the value the gate last knew there (its first live reading, then what the gate wrote and
confirmed). A change larger than half a raw step of the device (or the point's ``deadband``, if
larger) that the gate cannot explain is an *override*: an event ``kind = "override"`` with the
point and its old and new values, and a *hold* on the point. While a point is held, automatic
writes to it (the optimiser's, the cloud's desired state) are refused, for ``gate.override_hold``
or until an operator acknowledges the event (the ``ack`` command); operator writes still pass.

What the gate explains: the value it just wrote, and for ``readback_timeout`` after a write the
value before it (an OPC UA notification sampled before the write may arrive after the read-back).
A write the gate had to undo explains nothing but the restored value, so a late landing of the
undone value is reported as an override too. Further changes of a point already held raise no
new event: the hold runs on from the latest change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from drivers.base import GOOD, Reading
from edge_agent.config import PointConfig
from edge_agent.control.values import number

log = logging.getLogger(__name__)

AUTOMATIC_SOURCES = ("optimizer", "cloud")  # the sources a hold pauses; operators and rollbacks still write


@dataclass
class Hold:
    """Automatic writes to ``point`` are paused until ``until`` or until ``event`` is acknowledged."""

    point: str
    since: float
    until: float
    old: float | None
    new: float | None
    event: dict[str, Any] = field(repr=False)  # the override event; its "id" is set once the twin stored it

    @property
    def event_id(self) -> int | None:
        value = self.event.get("id")
        return value if isinstance(value, int) else None

    def reason(self) -> str:
        event = f"event {self.event_id}" if self.event_id is not None else "its override event"
        return (f"held after an operator override at the device ({_g(self.old)} -> {_g(self.new)}): automatic writes "
                f"resume in {max(0.0, self.until - time.time()):.0f} s or when {event} is acknowledged")


class OverrideWatch:
    """Notices device-side changes of writable points and keeps the holds they cause."""

    def __init__(self, hold: float, record_event: Callable[[dict[str, Any]], None],
                 resolution: Callable[[str, float], float]) -> None:
        self.hold = hold
        self.record_event = record_event
        self.resolution = resolution  # one raw step of the device near a value
        self.known: dict[str, float] = {}  # the value the gate last knew at the device, per point
        self.explained: dict[str, list[tuple[float, float]]] = {}  # point -> [(value, until)] the gate wrote
        self.holds: dict[str, Hold] = {}
        self._not_live: dict[str, Reading] = {}  # readings restored from the twin at start: not device news

    def ignore(self, readings: Mapping[str, Reading]) -> None:
        """Readings that are not news from the device (restored from the twin at start)."""
        self._not_live.update(readings)

    # ------------------------------------------------------------------ noticing

    def check(self, points: Mapping[str, tuple[str, PointConfig]],
              latest: Callable[[str], Reading | None]) -> list[Hold]:
        """Compare every writable point's latest good value with what the gate knew; returns new holds.

        ``points``: name -> (device, point) of the writable points. Called between the gate's
        writes, never during one, so a change seen here was not made by a write in progress.
        """
        now = time.time()
        new: list[Hold] = []
        for name, (device, point) in points.items():
            if not point.writable:
                continue
            reading = latest(name)
            if reading is None or reading.quality != GOOD or reading is self._not_live.get(name):
                continue
            value = number(reading.value)
            if value is None:
                continue
            known = self.known.get(name)
            if known is None:
                self.known[name] = value  # the first live value is the baseline
                continue
            if self._same(name, point, known, value):
                continue
            self.known[name] = value
            if self._explained(name, value, now):
                log.debug("gate: %s = %g at the device: a value the gate wrote", name, value)
                continue
            held = self.holds.get(name)
            if held is not None and now < held.until:
                # the operator has the point already: no event per change, the hold runs from the last one
                held.new, held.until = value, now + self.hold
                log.debug("gate: %s = %g at the device, still held (event %s)", name, value, held.event_id)
                continue
            new.append(self._raise(name, device, known, value, now))
        return new

    def _same(self, name: str, point: PointConfig, a: float, b: float) -> bool:
        step = self.resolution(name, a)
        threshold = max(point.deadband, step / 2 if math.isfinite(step) else 0.0, 1e-9 * max(1.0, abs(a)))
        return abs(a - b) <= threshold

    def _explained(self, name: str, value: float, now: float) -> bool:
        entries = [(v, until) for v, until in self.explained.get(name, ()) if until >= now]
        self.explained[name] = entries
        return any(abs(v - value) <= 1e-9 * max(1.0, abs(v)) for v, _ in entries)

    def _raise(self, name: str, device: str, old: float, new: float, now: float) -> Hold:
        until = now + self.hold
        event: dict[str, Any] = {
            "ts": now, "source": "gate", "kind": "override", "state": "raised", "equipment": device, "point": name,
            "old": old, "new": new, "hold_until": until,
            "message": f"{name} changed at the device from {old:g} to {new:g} and the gate did not write it "
                       f"(an operator?): automatic writes to it paused for {self.hold:g} s or until this event "
                       "is acknowledged"}
        log.warning("gate: %s", event["message"])
        self.record_event(event)
        hold = self.holds[name] = Hold(name, now, until, old, new, event)
        return hold

    # ------------------------------------------------------------------ what the gate did

    def wrote(self, name: str, final: float | None, also: Iterable[float] = (), *, grace: float = 0.0) -> None:
        """After a gate write of ``name``: ``final`` is at the device now (None: unknown); ``also``
        stays explained for ``grace`` seconds."""
        now = time.time()
        if final is not None:
            self.known[name] = final
        entries = [(v, until) for v, until in self.explained.get(name, ()) if until >= now]
        entries += [(v, now + grace) for v in also]
        if final is not None:
            entries.append((final, now + grace))
        self.explained[name] = entries[-8:]

    # ------------------------------------------------------------------ holds

    def held(self, name: str) -> Hold | None:
        """The hold on ``name``, if one is in force (an expired one is cleared here)."""
        hold = self.holds.get(name)
        if hold is not None and time.time() >= hold.until:
            self._clear(hold, f"the hold of {self.hold:g} s expired")
            return None
        return hold

    def expire(self) -> None:
        for name in list(self.holds):
            self.held(name)

    def release(self, event_id: int, by: str) -> list[str]:
        """An operator acknowledged event ``event_id``: lift the hold it set; returns the points released."""
        released = [hold for hold in self.holds.values() if hold.event_id == event_id]
        for hold in released:
            self._clear(hold, f"event {event_id} acknowledged by {by}")
        return [hold.point for hold in released]

    def _clear(self, hold: Hold, why: str) -> None:
        if self.holds.get(hold.point) is hold:
            del self.holds[hold.point]
        message = f"automatic writes to {hold.point} resume: {why}"
        log.info("gate: %s", message)
        self.record_event({"ts": time.time(), "source": "gate", "kind": "override", "state": "cleared",
                           "point": hold.point, "override_event": hold.event_id, "message": message})

    def restore(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Take up the holds still in force from stored override events (oldest first), after a restart."""
        last: dict[str, Mapping[str, Any]] = {}
        for event in events:
            point = (event.get("detail") or {}).get("point")
            if isinstance(point, str):
                last[point] = event
        now = time.time()
        for point, event in last.items():
            detail = event.get("detail") or {}
            until = float(detail.get("hold_until") or event["ts"] + self.hold)
            if event["state"] != "raised" or event.get("acked_by") is not None or until <= now:
                continue
            self.holds[point] = Hold(point, float(event["ts"]), until, number(detail.get("old")),
                                     number(detail.get("new")), {"id": event["id"]})
            log.warning("gate: %s is still held after an operator override (event %s) until %s", point,
                        event["id"], time.strftime("%H:%M:%S", time.localtime(until)))


def _g(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"
