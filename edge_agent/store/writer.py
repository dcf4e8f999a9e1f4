"""The reading buffer and the twin writer: everything devices and models report, into the twin.

Data path: drivers and models -> :meth:`TwinWriter.submit` (an in-memory list of chunks, bounded)
-> :meth:`TwinWriter.run`, which every ``twin.flush_interval`` (or sooner, when ``twin.flush_max``
readings are waiting) stores everything pending in one SQLite transaction off the event loop,
then hands what history kept to the cloud (:class:`Forward`). Events and write records take the
same road. The writer also keeps the latest Reading of every point in memory for the parts that
need current values fast (models, the safety gate: :class:`~edge_agent.store.latest.Latest`), and
every point's desired state (the twin's ``desired`` table, refreshed as write records and desired
documents are stored) for the retained ``twin`` snapshot; ``on_desired`` is called when it changes.

Back-pressure: once four ``flush_max`` are waiting, :meth:`room` blocks the pollers until a
flush catches up, so memory stays bounded however slow the disk is.

A failing twin (disk full, file locked, I/O errors) is different: waiting would stop polling for
as long as the disk stays full. So while flushes fail, pollers never wait; the readings are kept
for the next attempt up to four ``flush_max``, then the oldest are let go (counted in
``dropped``), while every point's latest reading stays in memory for the models, the gate, remote
``read`` and the cloud. The first failure is logged with its cause, repeats at DEBUG, and the
recovery once at INFO; :meth:`state` tells status.json. Every flush tries again, so writing
resumes by itself when space returns.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from drivers.base import Reading
from edge_agent.config import AgentConfig, TwinSection
from edge_agent.errors import TwinError
from edge_agent.store import floats
from edge_agent.store.latest import Latest
from edge_agent.store.twin import Chunk, DesiredClaim, DesiredDocument, Twin
from edge_agent.tasks import finish_in_thread, wait_event

log = logging.getLogger(__name__)
MAX_RECORDS = 10_000  # events and write records kept in memory while the twin cannot be written

INTERRUPTED = "the agent stopped before this was applied; not retried (publish a new version to try again)"


@dataclass(frozen=True, slots=True)
class TwinState:
    """The reading buffer and the twin writer's counters, for status and metrics."""

    stored: int  # history rows written since start
    received: int  # readings received from devices and models since start
    flushes: int
    flush_errors: int
    pending: int  # readings waiting for the next flush
    flush_seconds: float  # total wall time in flushes
    last_flush_seconds: float
    failing_since: float | None = None  # unix time of the first failed write of the current outage
    last_error: str = ""
    dropped: int = 0  # readings let go (never stored) while the twin could not be written
    dropped_records: int = 0  # events and write records let go likewise


class Forward(Protocol):
    """Where stored readings and records go next (the cloud sync).

    ``prepare`` runs in the writer's worker thread right after the twin stored ``readings`` (one
    call at a time); what it returns is handed to ``add`` on the event loop with them."""

    def prepare(self, readings: Sequence[Reading]) -> Any: ...

    def add(self, readings: Sequence[Reading], prepared: Any = None) -> None: ...

    async def append_event(self, kind: str, fields: dict[str, Any]) -> None: ...


class TwinWriter:
    """Buffers readings and records on the event loop; stores them in the twin in batches."""

    def __init__(self, twin: Twin, settings: TwinSection) -> None:
        self.twin = twin
        self.settings = settings
        self.forward: Forward | None = None  # set while the cloud sync runs
        self.latest = Latest()
        self.desired: dict[str, dict[str, Any]] = {}  # point -> its desired state (DESIRED_FIELDS)
        self.on_desired: Callable[[], None] | None = None  # called when a desired state changed
        self.stored = 0  # history rows written since start
        self.received = 0  # readings received from devices and models since start
        self.flush_seconds = 0.0  # wall time spent in twin flushes (for the average write latency)
        self.last_flush_seconds = 0.0
        self.flushes = 0
        self.flush_errors = 0
        self._pending: list[Chunk] = []
        self._pending_count = 0
        self._records: list[tuple[str, dict[str, Any]]] = []  # ("event" | "write", record), to store
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set while the pending readings are under the high-water mark
        self._room.set()
        self._lock = asyncio.Lock()
        self._points_synced = 0.0
        self.failing_since: float | None = None
        self.last_error = ""
        self.dropped = 0
        self.dropped_records = 0
        self._lost_in_outage = 0
        self._points_config: AgentConfig | None = None  # a points table update still to make

    def restore(self) -> None:
        """Take every point's last stored value as its latest, and the desired states (blocking: call
        from a worker thread). A desired state still pending was cut short by a stop: it becomes failed."""
        for row in self.twin.current():
            if row["ts"] is not None:
                self.latest[row["name"]] = Reading(row["name"], row["value"], row["quality"], row["ts"])
        interrupted = self.twin.interrupt_pending(INTERRUPTED, time.time())
        if interrupted:
            log.warning("desired state: %d point(s) were still pending when the agent stopped; marked failed, "
                        "not retried", interrupted)
        self.desired = self.twin.desired_state()

    @property
    def pending_count(self) -> int:
        """Readings received and not yet stored in the twin."""
        return self._pending_count

    def state(self) -> TwinState:
        return TwinState(self.stored, self.received, self.flushes, self.flush_errors, self._pending_count,
                         self.flush_seconds, self.last_flush_seconds, self.failing_since, self.last_error,
                         self.dropped, self.dropped_records)

    # ------------------------------------------------------------------ input (on the event loop)

    def submit(self, readings: Sequence[Reading]) -> None:
        """Accept readings from a device or a model; stored at the next flush."""
        if not readings:
            return
        self._pending.append((time.time(), readings))
        self.latest.take(readings)
        self._pending_count += len(readings)
        self.received += len(readings)
        flush_max = self.settings.flush_max
        if self._pending_count >= flush_max:
            self._wake.set()
            if self._pending_count >= 4 * flush_max:
                if self.failing_since is None:
                    self._room.clear()
                else:  # a failing disk must not stop polling: let the oldest go instead
                    self._shed()

    def _shed(self) -> None:
        """Drop the oldest pending chunks beyond four ``flush_max`` (the latest readings stay in ``latest``)."""
        bound = 4 * self.settings.flush_max
        while self._pending_count > bound and len(self._pending) > 1:
            _, readings = self._pending.pop(0)
            self._pending_count -= len(readings)
            self.dropped += len(readings)
            self._lost_in_outage += len(readings)

    async def room(self) -> None:
        """Wait while the twin is behind: pollers pause here so memory stays bounded (back-pressure)."""
        await self._room.wait()

    def release(self) -> None:
        """Let every poller waiting for room go (they are being stopped)."""
        self._room.set()

    def record(self, kind: str, record: dict[str, Any]) -> None:
        """Accept an ``event`` (anomaly, outage, command) or a ``write`` record; stored at the next flush."""
        self._records.append((kind, record))
        if len(self._records) > MAX_RECORDS:  # only while the twin cannot be written
            del self._records[0]
            self.dropped_records += 1
        self._wake.set()

    def sync_points_later(self, config: AgentConfig) -> None:
        """The points table could not be updated (at start): try again before each flush until it works."""
        self._points_config = config

    def _failed(self, exc: TwinError) -> None:
        self.last_error = str(exc)
        if self.failing_since is None:
            self.failing_since = time.time()
            self._lost_in_outage = 0
            log.error("%s; polling continues with every point's latest value in memory, up to %d older readings "
                      "are kept for the twin, and every flush tries again", exc, 4 * self.settings.flush_max)
        else:
            log.debug("twin still not writable: %s", exc)
        self._room.set()  # pollers that waited for room must not wait for a disk that may stay full

    def _recovered(self) -> None:
        if self.failing_since is not None:
            log.info("twin: writing again after %.0f s; %d readings were let go while it could not be written",
                     time.time() - self.failing_since, self._lost_in_outage)
            self.failing_since, self.last_error = None, ""

    # ------------------------------------------------------------------ storing

    async def run(self) -> None:
        """Flush every ``flush_interval``, or as soon as ``flush_max`` readings or a record are waiting."""
        while True:
            await wait_event(self._wake, self.settings.flush_interval)
            self._wake.clear()
            await self.flush()
            await self.store_records()

    async def flush(self, *, final: bool = False) -> int:
        """Store every pending reading in one transaction, off the event loop.

        Shielded as a whole: a cancelled caller (stop() cancelling the writer) still lets the
        batch be committed *and* handed to the cloud sync, never one without the other.
        """
        inner = asyncio.ensure_future(self._flush(final=final))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            await asyncio.wait([inner])
            raise

    async def _flush(self, *, final: bool) -> int:
        async with self._lock:
            # the points table (current values) is refreshed at most every points_interval: one
            # UPDATE per point per refresh instead of per flush (history gets every reading). A
            # quiet device's last change waits in the twin until the next refresh is due, even
            # when no reading follows it.
            now = time.monotonic()
            update = final or now - self._points_synced >= self.settings.points_interval
            if not (self._pending or (update and self.twin.has_unsynced)):
                return 0
            chunks, self._pending, self._pending_count = self._pending, [], 0
            self._room.set()
            try:
                began = time.perf_counter()
                if self._points_config is not None:
                    await asyncio.to_thread(self.twin.sync_points, self._points_config)
                    self._points_config = None
                forward = self.forward
                kept, prepared = await asyncio.to_thread(self._store, chunks, update, forward)
                if update:
                    self._points_synced = now
                self.last_flush_seconds = time.perf_counter() - began
                self.flush_seconds += self.last_flush_seconds
            except TwinError as exc:
                # Keep the readings and try again at the next flush; a full disk or a locked
                # file must not lose data that is still in memory (up to the bound, see _shed).
                self.flush_errors += 1
                self._pending[:0] = chunks
                self._pending_count += sum(len(c[1]) for c in chunks)
                self._failed(exc)
                self._shed()
                return 0
            self._recovered()
            self.stored += len(kept)
            self.flushes += 1
            if self.forward is not None:  # a reload may have changed it meanwhile: then it prepares nothing
                self.forward.add(kept, prepared if self.forward is forward else None)
            return len(kept)

    def _store(self, chunks: list[Chunk], update: bool, forward: Forward | None) -> tuple[Sequence[Reading], Any]:
        """Store the chunks and let the forward prepare what it sends of them (worker thread)."""
        kept = self.twin.write_batch(chunks, update_points=update)
        try:
            return kept, forward.prepare(kept) if forward is not None and kept else None
        finally:
            floats.taken()  # what the telemetry did not take of this flush's texts, it never will

    async def store_records(self) -> None:
        """Store pending events and write records in the twin, then hand them to the cloud."""
        # under the lock: the twin connection takes one transaction at a time (prune, claims)
        async with self._lock:
            await self._store_records()

    async def _store_records(self) -> None:
        records, self._records = self._records, []
        for index, (kind, record) in enumerate(records):
            try:
                if kind == "write":
                    record["id"], desired = await finish_in_thread(self._store_write, record)
                    self._refresh_desired(desired)
                else:
                    record["id"] = await finish_in_thread(self.twin.add_event, record)
            except TwinError as exc:
                self._failed(exc)  # keep this one and the rest for the next attempt, in order
                self._records[:0] = records[index:]
                excess = len(self._records) - MAX_RECORDS
                if excess > 0:
                    del self._records[:excess]
                    self.dropped_records += excess
                return
            self._recovered()
            if self.forward is not None:
                event_type = "write" if kind == "write" else str(record["kind"])
                try:
                    await self.forward.append_event(event_type, {k: v for k, v in record.items() if k != "kind"})
                except TwinError as exc:
                    log.error("%s; %s %s is in the twin but not queued for the cloud", exc, kind, record["id"])

    def _store_write(self, record: dict[str, Any]) -> tuple[int, dict[str, dict[str, Any]]]:
        """Store a write record; returns its id and the point's desired state after it (worker thread)."""
        record_id = self.twin.record_write(record)
        return record_id, self.twin.desired_state([record["point"]])

    def _refresh_desired(self, rows: dict[str, dict[str, Any]]) -> None:
        """Take desired states read back from the twin (on the event loop); tell ``on_desired`` of a change."""
        changed = {point: row for point, row in rows.items() if self.desired.get(point) != row}
        if changed:
            self.desired.update(changed)
            if self.on_desired is not None:
                self.on_desired()

    async def claim_desired(self, document: DesiredDocument) -> DesiredClaim:
        """Record a desired document as handled when its version is new (see :meth:`Twin.claim_desired`)."""
        async with self._lock:
            # the verdicts already queued belong to older documents: stored first, they cannot
            # overwrite the new document's pending states
            await self._store_records()
            claim = await finish_in_thread(self.twin.claim_desired, document)
            if claim.accepted:
                self._refresh_desired(await finish_in_thread(self.twin.desired_state, list(document.points)))
        return claim

    async def sync_points(self, config: AgentConfig) -> None:
        """Make the twin's points table match a (reloaded) config, between flushes."""
        async with self._lock:
            await finish_in_thread(self.twin.sync_points, config)

    async def prune(self, before: float, *, table: str = "history") -> None:
        """Delete rows of ``table`` older than ``before`` (between flushes, off the event loop)."""
        async with self._lock:
            try:
                removed = await finish_in_thread(functools.partial(self.twin.prune, before, table=table))
            except TwinError as exc:
                log.error("%s", exc)
                return
        if removed:
            log.info("twin: pruned %d %s rows older than retention", removed, table)

    async def close(self) -> None:
        """Store what is pending (readings, then records) and close the twin."""
        await self.flush(final=True)
        await self.store_records()
        await asyncio.to_thread(self.twin.close)
