"""One device's supervisor: connect, read or subscribe, and reconnect forever with backoff.

Each configured device gets one :class:`DeviceRunner` task. A failing device never blocks
another: the runner catches its driver's errors, marks the device's points bad (then stale
after three missed intervals), waits a capped, jittered exponential backoff and tries again.
The device counts as up (and the backoff starts over) only once data flows: a first read, or a
subscription in place. A connect alone proves little when the connection is shared (a unit
behind a Modbus gateway whose connection other units keep open), so a unit that connects and
then never answers keeps backing off instead of flapping up and down at ``retry_min``.
Logging follows the 3 a.m. rule: the first failure is a WARNING naming the device and the
cause, repeats are DEBUG, and recovery is one INFO line with the outage length.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import drivers
from drivers.base import BAD, STALE, Driver, Reading
from edge_agent.config import DeviceConfig
from edge_agent.errors import DriverError
from edge_agent.pacing import backoff, next_tick

log = logging.getLogger(__name__)

Submit = Callable[[Sequence[Reading]], None]
LastValues = Callable[[str], Reading | None]


@dataclass(slots=True)
class DeviceStatus:
    """What the agent knows about a device's link, for status output and health."""

    name: str
    protocol: str
    state: str = "connecting"  # connecting | up | down
    since: float = 0.0  # when the state last changed (unix seconds)
    last_ok: float = 0.0  # last successful read, data change or link check
    last_error: str = ""
    failures: int = 0  # consecutive failed attempts
    reads: int = 0  # completed polls
    updates: int = 0  # readings delivered by subscription
    read_errors: int = 0


class DeviceRunner:
    """Keeps one device mirrored into the twin for as long as the agent runs."""

    def __init__(self, device: DeviceConfig, data_dir: Path, submit: Submit, last_value: LastValues,
                 *, driver_factory: Callable[[DeviceConfig, Path], Driver] | None = None,
                 room: Callable[[], Awaitable[None]] | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.device = device
        self.room = room
        self.on_event = on_event
        self.data_dir = data_dir
        self.submit = submit
        self.last_value = last_value
        self.status = DeviceStatus(device.name, device.protocol, since=time.time())
        self._factory = driver_factory or drivers.driver_class(device.protocol)
        self._rng = random.Random()
        self._marked: str | None = None  # quality we last forced on the points (bad/stale)
        self._down_since: float | None = None
        self._attempt = 0  # consecutive failed attempts: the backoff exponent
        self._stopping = False
        self.driver: Driver | None = None

    @property
    def subscribe(self) -> bool:
        return getattr(self.device, "mode", "poll") == "subscribe"

    def stop(self) -> None:
        """Ask the loops to end at their next turn.

        Cancellation alone is not enough: a library's ``asyncio.wait_for`` can swallow a cancel
        that races with a reply (Python 3.11), and a busy poll loop would then carry on.
        """
        self._stopping = True

    async def run(self) -> None:
        """Connect and mirror until stopped or cancelled."""
        while not self._stopping:
            driver = self._factory(self.device, self.data_dir)
            self.driver = driver
            try:
                await driver.connect()
                if self.subscribe and driver.supports_subscribe:
                    await self._follow(driver)
                else:
                    await self._poll(driver)
            except DriverError as exc:
                self._down(exc)
            finally:
                self.driver = None
                await driver.close()
            await asyncio.sleep(backoff(self._attempt, self.device.retry_min, self.device.retry_max, self._rng))
            self._attempt += 1

    async def _poll(self, driver: Driver) -> None:
        """Read at once, then at every tick of the device's interval (shared with the other devices of
        that interval: :func:`edge_agent.pacing.next_tick`). A read that takes longer than the
        interval is followed by the next at once, skipping the ticks it missed instead of bursting."""
        interval = self.device.interval
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if self.room is not None:
                await self.room()  # the twin is behind: wait rather than pile readings up in memory
            started = loop.time()
            readings = await driver.read()
            if self.status.state != "up":
                self._up()
            self._ok()
            self.status.reads += 1
            self.submit(readings)
            if loop.time() - started < interval:
                await next_tick(interval)
            else:
                await asyncio.sleep(0)

    async def _follow(self, driver: Driver) -> None:
        await driver.subscribe(self._on_change)
        self._up()
        while not self._stopping:
            await asyncio.sleep(self.device.interval)
            await driver.check()
            self._ok()

    def _on_change(self, readings: Sequence[Reading]) -> None:
        self._ok()
        self.status.updates += len(readings)
        self.submit(readings)

    def _ok(self) -> None:
        self.status.last_ok = time.time()
        self._marked = None

    def _up(self) -> None:
        now = time.time()
        if self._down_since is not None:
            log.info("device %s: recovered after %.1f s", self.device.name, now - self._down_since)
            self._event("up", f"{self.device.name}: recovered after {now - self._down_since:.1f} s", now)
        else:
            log.info("device %s: connected (%s)", self.device.name, self.device.protocol)
        self._down_since = None
        self._attempt = 0
        self.status.state, self.status.since = "up", now
        self.status.failures = 0
        self.status.last_ok = now

    def _down(self, exc: DriverError) -> None:
        now = time.time()
        self.status.failures += 1
        self.status.read_errors += 1
        self.status.last_error = str(exc)
        if self._down_since is None:
            self._down_since = now
            # driver errors name the device themselves
            log.warning("%s; points marked bad, retrying with backoff up to %g s", exc, self.device.retry_max)
            self._event("down", str(exc), now)
        else:
            log.debug("%s (still failing, %d attempts)", exc, self.status.failures)
        if self.status.state != "down":
            self.status.state, self.status.since = "down", now
        self.mark(BAD)

    def _event(self, state: str, message: str, now: float) -> None:
        if self.on_event is not None:
            self.on_event({"ts": now, "source": self.device.name, "kind": "device", "state": state,
                           "equipment": self.device.name, "message": message})

    def watch(self, now: float) -> None:
        """Called periodically: points turn stale after three intervals without contact."""
        contact = self.status.last_ok or self.status.since
        if now - contact > self.device.stale_after:
            self.mark(STALE)

    def mark(self, quality: str) -> None:
        """Force the device's points to ``quality``, keeping their last value."""
        if self._marked == quality or (self._marked == STALE and quality == BAD):
            return
        self._marked = quality
        now = time.time()
        readings = []
        for point in self.device.points:
            last = self.last_value(point.name)
            readings.append(Reading(point.name, last.value if last else None, quality, now))
        self.submit(readings)
