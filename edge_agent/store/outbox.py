"""The durable store-and-forward outbox: every MQTT message is written here before paho sees it.

One SQLite file of its own (``data_dir/outbox.db``), WAL mode. A message is a row; it is handed to
the MQTT link in id order (:meth:`Outbox.take`) and deleted only when its PUBACK arrives
(:meth:`Outbox.ack`). After a restart every row still present is pending again, so a message is
delivered at least once; a repeat is always a repeat of the same seq with the same payload.

Sequence numbers. ``telemetry`` and ``event`` messages each carry a ``seq`` that grows by exactly
one per message of that kind, persisted in the ``meta`` row and assigned in the same transaction
as the insert, so a crash can neither reuse nor skip one. The payload embeds the seq, so the
caller hands in a *builder* (``Draft.payload`` as ``Callable[[Stamp], bytes]``) that the outbox
calls with the seq inside the transaction.

Limits and drops (:class:`OutboxLimits`). When a new message would take the outbox over
``max_rows`` or ``max_bytes``, the oldest telemetry not in flight is dropped first. Events and
command ``response`` messages together keep to their own share (``event_share`` of both limits,
10 % by default): a new one past it drops the oldest of them, so whatever floods the audit trail
can never crowd telemetry out. Dropped events are reported like telemetry: counted for ever
(``dropped_events``, ``dropped_responses``), and the next ``event`` message carries their seq
range in a ``gap`` record. Snapshots (``state``, ``twin``) are never dropped, since a new one
replaces the older pending one of the same topic. Telemetry that does not fit after the oldest
telemetry went drops events too (telemetry is never refused because of events); only when what
is left is in flight is new telemetry refused (it still consumes its seq and is counted as
dropped). Drops are counted for
ever (``dropped_messages``, ``dropped_samples``) and collected into one unreported :class:`Gap`
that the *next* telemetry message receives in its :class:`Stamp`, in the transaction that inserts
it, so it can carry ``{"gap": {"from_seq", "to_seq", "messages", "samples"}}``.
``from_seq``..``to_seq`` bounds the dropped seqs (seqs inside it that the receiver did get were
delivered, or reported by another record); ``messages`` and ``samples`` count what was dropped. If
a message carrying a gap is dropped in turn, its gap is folded into the next one. So a receiver
can check: every seq it never got lies inside some record's range, and the records' ``messages``
add up to the number of such seqs (more only when a message that had been sent but not
acknowledged was dropped later). Messages in flight are never dropped.

Durability. ``synchronous=NORMAL`` (the default): in WAL mode a commit is in the OS page cache
when ``append`` returns, so ``kill -9`` or a crash of the agent loses nothing committed; only an
OS crash or power cut may lose the last commits (never corrupt the file). ``FULL`` fsyncs the WAL
on every commit and survives power loss too, at the cost of one fsync per append and ack batch.

Disk. The file is created with ``auto_vacuum=INCREMENTAL`` and ``journal_size_limit``; pages freed
by acks are reused by later appends, and :meth:`Outbox.maintain` (run after every
``maintain_every`` bytes acked and on close) returns free pages to the OS and truncates the WAL,
so a drained backlog does not leave a large file behind.

Threads. One connection, opened with ``check_same_thread=False``; every public method takes a
lock, so calls from the event loop (``ack`` in on_publish) and from ``asyncio.to_thread``
(big appends) are serialised rather than interleaved. Blocking calls belong in a thread.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_agent.errors import TwinError
from edge_agent.store import sqlite
from edge_agent.store.messages import (
    EVENT_KINDS,
    SNAPSHOT_KINDS,
    Appended,
    Build,
    Draft,
    Gap,
    Message,
    OutboxLimits,
    OutboxStats,
    Stamp,
)

log = logging.getLogger(__name__)
_TELEMETRY = frozenset({"telemetry"})

# Each entry moves the schema one version up (PRAGMA user_version). Append, never edit.
MIGRATIONS: list[str] = [
    # 1: messages and the one-row meta table (next seqs, drop counters, unreported gap)
    """
    CREATE TABLE messages (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        kind         TEXT NOT NULL,
        topic        TEXT NOT NULL,
        payload      BLOB NOT NULL,
        qos          INTEGER NOT NULL,
        retain       INTEGER NOT NULL,
        created      REAL NOT NULL,
        seq          INTEGER,
        samples      INTEGER NOT NULL DEFAULT 0,
        gap_from     INTEGER,
        gap_to       INTEGER,
        gap_messages INTEGER,
        gap_samples  INTEGER
    );
    CREATE INDEX messages_kind ON messages (kind);
    CREATE TABLE meta (
        id                  INTEGER PRIMARY KEY CHECK (id = 1),
        next_telemetry_seq  INTEGER NOT NULL,
        next_event_seq      INTEGER NOT NULL,
        dropped_messages    INTEGER NOT NULL,
        dropped_samples     INTEGER NOT NULL,
        gap_from            INTEGER,
        gap_to              INTEGER,
        gap_messages        INTEGER NOT NULL,
        gap_samples         INTEGER NOT NULL
    );
    INSERT INTO meta VALUES (1, 1, 1, 0, 0, NULL, NULL, 0, 0);
    """,
    # 2: command responses carry the request's MQTT 5 Correlation Data (edge_agent/remote/dispatch.py)
    """
    ALTER TABLE messages ADD COLUMN correlation BLOB;
    """,
    # 3: events and responses keep to a share of the limits; what they drop is counted and reported
    """
    ALTER TABLE meta ADD COLUMN dropped_events INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE meta ADD COLUMN dropped_responses INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE meta ADD COLUMN event_gap_from INTEGER;
    ALTER TABLE meta ADD COLUMN event_gap_to INTEGER;
    ALTER TABLE meta ADD COLUMN event_gap_messages INTEGER NOT NULL DEFAULT 0;
    """,
]

META_COLUMNS = ("next_telemetry_seq, next_event_seq, dropped_messages, dropped_samples, "
                 "gap_from, gap_to, gap_messages, gap_samples")
META_EVENT_COLUMNS = "dropped_events, dropped_responses, event_gap_from, event_gap_to, event_gap_messages"
_INSERT = ("INSERT INTO messages (kind, topic, payload, qos, retain, created, seq, samples, "
           "gap_from, gap_to, gap_messages, gap_samples, correlation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SELECT = "SELECT id, kind, topic, payload, qos, retain, created, seq, samples, correlation FROM messages"


@dataclass(slots=True)
class _State:
    """The meta row plus row and byte totals; copied at the start of a transaction, kept on commit."""

    next_seq: dict[str, int]
    dropped_messages: int
    dropped_samples: int
    gap: Gap | None
    rows: int
    bytes: int
    telemetry_rows: int
    telemetry_bytes: int
    event_rows: int = 0  # events and responses
    event_bytes: int = 0
    dropped_events: int = 0
    dropped_responses: int = 0
    event_gap: Gap | None = None


class Outbox:
    """The durable outbox. Open with :meth:`open`; close with :meth:`close` (or use ``with``)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, limits: OutboxLimits, max_inflight: int,
                 maintain_every: int, clock: Callable[[], float]) -> None:
        self.conn = conn
        self.path = path
        self.limits = limits
        self.max_inflight = max_inflight
        self.maintain_every = maintain_every
        self._clock = clock
        self._lock = threading.RLock()
        self._cursor = 0  # every row with id <= cursor still present is in flight
        self._inflight: dict[int, tuple[str, int]] = {}  # id -> (kind, payload bytes)
        self._freed_since_maintain = 0
        self._dropping = False  # for logging: first drop at WARNING, repeats at DEBUG
        self._dropping_events = False
        self._over_limit = False
        self._state = self._load_state()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path, *, limits: OutboxLimits | None = None, max_inflight: int = 20,
             synchronous: str = "normal", maintain_every: int = 16 * 1024 * 1024,
             clock: Callable[[], float] = time.time) -> Outbox:
        """Open (creating or migrating) the outbox file. ``max_inflight`` bounds unacknowledged messages."""
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        if synchronous.upper() not in ("NORMAL", "FULL"):  # [mqtt] outbox_sync spells them in lower case
            raise ValueError(f"synchronous must be normal or full, got {synchronous!r}")
        conn = sqlite.connect(path, "the outbox", wal=False)
        try:
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                # Only takes effect before the first table exists, or through VACUUM; on a new
                # file the VACUUM is instant.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            conn.execute("PRAGMA journal_size_limit = 8388608")  # the WAL shrinks back to 8 MiB
            # Some SQLite builds (Debian's among them) default to secure_delete, which overwrites
            # every acknowledged payload with zeros: twice the disk writes for nothing here
            # (measured: drain 0.91 -> 0.54 us per sample).
            conn.execute("PRAGMA secure_delete = OFF")
            sqlite.migrate(conn, path, MIGRATIONS, "outbox")
            return cls(conn, path, limits=limits or OutboxLimits(), max_inflight=max_inflight,
                       maintain_every=maintain_every, clock=clock)
        except (sqlite3.Error, TwinError) as exc:
            conn.close()
            if isinstance(exc, TwinError):
                raise
            raise TwinError(f"{path}: cannot open the outbox: {exc}") from exc

    def _load_state(self) -> _State:
        meta = self.conn.execute(f"SELECT {META_COLUMNS}, {META_EVENT_COLUMNS} FROM meta").fetchone()
        gap = Gap(meta[4], meta[5], meta[6], meta[7]) if meta[4] is not None else None
        event_gap = Gap(meta[10], meta[11], meta[12], 0) if meta[10] is not None else None
        state = _State({"telemetry": meta[0], "event": meta[1]}, meta[2], meta[3], gap, 0, 0, 0, 0,
                       dropped_events=meta[8], dropped_responses=meta[9], event_gap=event_gap)
        for kind, rows, size in self.conn.execute(
                "SELECT kind, count(*), coalesce(sum(length(payload)), 0) FROM messages GROUP BY kind"):
            state.rows += rows
            state.bytes += size
            if kind == "telemetry":
                state.telemetry_rows, state.telemetry_bytes = rows, size
            elif kind in EVENT_KINDS:
                state.event_rows += rows
                state.event_bytes += size
        return state

    @contextmanager
    def _transaction(self, what: str) -> Iterator[_State]:
        """BEGIN IMMEDIATE ... COMMIT on a copy of the state, kept only when the commit succeeds."""
        with self._lock:
            state = replace(self._state, next_seq=dict(self._state.next_seq))
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield state
                    self._write_meta(state)
                except BaseException:
                    if self.conn.in_transaction:  # SQLite rolls back by itself after SQLITE_FULL and the like
                        self.conn.execute("ROLLBACK")
                    raise
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise TwinError(f"{self.path}: cannot {what}: {exc}") from exc
            self._state = state

    def _write_meta(self, s: _State) -> None:
        gap, event_gap = s.gap, s.event_gap
        self.conn.execute(
            "UPDATE meta SET next_telemetry_seq = ?, next_event_seq = ?, dropped_messages = ?, dropped_samples = ?, "
            "gap_from = ?, gap_to = ?, gap_messages = ?, gap_samples = ?, dropped_events = ?, dropped_responses = ?, "
            "event_gap_from = ?, event_gap_to = ?, event_gap_messages = ?",
            (s.next_seq["telemetry"], s.next_seq["event"], s.dropped_messages, s.dropped_samples,
             gap.from_seq if gap else None, gap.to_seq if gap else None,
             gap.messages if gap else 0, gap.samples if gap else 0, s.dropped_events, s.dropped_responses,
             event_gap.from_seq if event_gap else None, event_gap.to_seq if event_gap else None,
             event_gap.messages if event_gap else 0))

    def close(self) -> None:
        """Reclaim free pages, truncate the WAL and close the connection."""
        with self._lock:
            try:
                self.maintain()
            except TwinError as exc:
                log.warning("%s", exc)
            self.conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ appending

    def append(self, drafts: Iterable[Draft]) -> list[Appended]:
        """Store messages in one transaction, in order; return each one's id and seq.

        Builders run inside the transaction; if one raises, nothing of the batch is stored and no
        seq is used. A telemetry message refused because the outbox is full of events comes back
        with ``id=None``; its seq is used and reported in the next gap.
        """
        with self._lock:
            dropped_before = (self._state.dropped_messages, self._state.dropped_events + self._state.dropped_responses)
            with self._transaction("append to the outbox") as state:
                now = self._clock()
                result = [self._append_one(state, draft, now) for draft in drafts]
            self._log_drops(*dropped_before)
            return result

    def append_telemetry(self, topic: str, build: Build, samples: int) -> Appended:
        """Shorthand for appending one telemetry message (QoS 1, not retained)."""
        return self.append([Draft("telemetry", topic, build, samples)])[0]

    def _append_one(self, state: _State, draft: Draft, now: float) -> Appended:
        kind = draft.kind
        seq = state.next_seq.get(kind)
        gap = None
        if seq is not None:
            state.next_seq[kind] = seq + 1
        if kind == "telemetry":
            gap, state.gap = state.gap, None
        elif kind == "event":
            gap, state.event_gap = state.event_gap, None
        payload = draft.payload(Stamp(seq, gap)) if callable(draft.payload) else draft.payload
        payload = bytes(payload)
        size = len(payload)
        if kind in SNAPSHOT_KINDS:
            self._replace_snapshot(state, kind, draft.topic)
        if kind in EVENT_KINDS:
            self._keep_event_share(state, size)
        if not self._make_room(state, kind, size):
            assert seq is not None  # only telemetry is refused
            state.gap = Gap(seq, seq, 1, draft.samples).merge(gap)
            state.dropped_messages += 1
            state.dropped_samples += draft.samples
            return Appended(None, seq)
        cur = self.conn.execute(_INSERT, (
            kind, draft.topic, payload, draft.qos, int(draft.retain), now, seq, draft.samples,
            gap.from_seq if gap else None, gap.to_seq if gap else None,
            gap.messages if gap else None, gap.samples if gap else None, draft.correlation))
        state.rows += 1
        state.bytes += size
        if kind == "telemetry":
            state.telemetry_rows += 1
            state.telemetry_bytes += size
        elif kind in EVENT_KINDS:
            state.event_rows += 1
            state.event_bytes += size
        return Appended(cur.lastrowid, seq)

    def _replace_snapshot(self, state: _State, kind: str, topic: str) -> None:
        """A newer retained snapshot makes the pending (not in flight) older one of its topic useless."""
        for (size,) in self.conn.execute(
                "DELETE FROM messages WHERE kind = ? AND topic = ? AND id > ? RETURNING length(payload)",
                (kind, topic, self._cursor)).fetchall():
            state.rows -= 1
            state.bytes -= size

    def _keep_event_share(self, state: _State, size: int) -> None:
        """Drop the oldest events and responses (not in flight) until one more of ``size`` bytes fits their share."""
        need_rows = state.event_rows + 1 - self.limits.event_rows
        need_bytes = state.event_bytes + size - self.limits.event_bytes
        if need_rows > 0 or need_bytes > 0:
            self._drop_oldest(state, EVENT_KINDS, need_rows, need_bytes)

    def _droppable(self, state: _State, kinds: frozenset[str]) -> tuple[int, int]:
        """Rows and bytes of ``kinds`` that are not in flight."""
        rows = state.telemetry_rows if kinds == _TELEMETRY else state.event_rows
        size = state.telemetry_bytes if kinds == _TELEMETRY else state.event_bytes
        in_flight = [s for k, s in self._inflight.values() if k in kinds]
        return rows - len(in_flight), size - sum(in_flight)

    def _make_room(self, state: _State, kind: str, size: int) -> bool:
        """Drop the oldest telemetry until ``size`` more bytes and one more row fit.

        False means a telemetry message does not fit even then, nor after dropping every event and
        response not in flight (nothing was dropped for it). Other kinds always go in, after
        dropping what telemetry there is to drop.
        """
        need_rows = state.rows + 1 - self.limits.max_rows
        need_bytes = state.bytes + size - self.limits.max_bytes
        if need_rows <= 0 and need_bytes <= 0:
            return True
        if kind != "telemetry":
            self._drop_oldest(state, _TELEMETRY, need_rows, need_bytes)
            return True
        tele_rows, tele_bytes = self._droppable(state, _TELEMETRY)
        event_rows, event_bytes = self._droppable(state, EVENT_KINDS)
        if tele_rows + event_rows < need_rows or tele_bytes + event_bytes < need_bytes:
            return False
        rows, freed = self._drop_oldest(state, _TELEMETRY, need_rows, need_bytes)
        if rows < need_rows or freed < need_bytes:  # telemetry is never refused because of events
            self._drop_oldest(state, EVENT_KINDS, need_rows - rows, need_bytes - freed)
        return True

    def _drop_oldest(self, state: _State, kinds: frozenset[str], need_rows: int, need_bytes: int) -> tuple[int, int]:
        """Delete the oldest messages of ``kinds`` not in flight until ``need_rows`` and ``need_bytes`` are
        freed (or none is left); account for them in ``state``. Returns (rows, bytes) freed."""
        rows = freed = 0
        chosen: list[int] = []
        after = 0
        flying = json.dumps(list(self._inflight))
        marks = ", ".join("?" * len(kinds))
        while rows < need_rows or freed < need_bytes:
            batch = self.conn.execute(
                f"SELECT id, length(payload) FROM messages WHERE kind IN ({marks}) AND id > ? "
                "AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT 256",
                (*sorted(kinds), after, flying)).fetchall()
            if not batch:
                break
            for row_id, size in batch:
                rows, freed = rows + 1, freed + size
                chosen.append(row_id)
                if rows >= need_rows and freed >= need_bytes:
                    break
            after = batch[-1][0]
        if chosen:
            self._forget(state, self.conn.execute(
                "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) RETURNING kind, seq, samples, "
                "length(payload), gap_from, gap_to, gap_messages, gap_samples", (json.dumps(chosen),)).fetchall())
        return rows, freed

    @staticmethod
    def _forget(state: _State, dropped: list[tuple[Any, ...]]) -> None:
        """Count dropped rows (kind, seq, samples, bytes, carried gap) and fold them into the gaps to report."""
        gap, event_gap = state.gap, state.event_gap
        for kind, seq, samples, size, g_from, g_to, g_messages, g_samples in dropped:
            state.rows -= 1
            state.bytes -= size
            carried = Gap(g_from, g_to, g_messages, g_samples) if g_from is not None else None
            if kind == "telemetry":
                gap = Gap(seq, seq, 1, samples).merge(gap)
                if carried is not None:  # the gap this message was to report is still unreported
                    gap = gap.merge(carried)
                state.dropped_messages += 1
                state.dropped_samples += samples
                state.telemetry_rows -= 1
                state.telemetry_bytes -= size
                continue
            state.event_rows -= 1
            state.event_bytes -= size
            if kind == "event":
                event_gap = Gap(seq, seq, 1, 0).merge(event_gap)
                if carried is not None:
                    event_gap = event_gap.merge(carried)
                state.dropped_events += 1
            else:
                state.dropped_responses += 1
        state.gap, state.event_gap = gap, event_gap

    def _log_drops(self, dropped_before: int, events_before: int) -> None:
        events = self._state.dropped_events + self._state.dropped_responses - events_before
        if events and not self._dropping_events:
            self._dropping_events = True
            log.warning("outbox %s: events and command responses fill their share (%d rows, %d bytes): dropping "
                        "the oldest of them; the next event message reports the gap", self.path,
                        self.limits.event_rows, self.limits.event_bytes)
        elif not events and self._dropping_events:
            self._dropping_events = False
            log.info("outbox %s: no longer dropping events; %d events and %d responses dropped so far", self.path,
                     self._state.dropped_events, self._state.dropped_responses)
        dropped = self._state.dropped_messages - dropped_before
        if dropped and not self._dropping:
            self._dropping = True
            log.warning("outbox %s full (%d rows, %d bytes; limits %d rows, %d bytes): dropping the oldest "
                        "telemetry", self.path, self._state.rows, self._state.bytes,
                        self.limits.max_rows, self.limits.max_bytes)
        elif dropped:
            log.debug("outbox %s: dropped %d more telemetry messages", self.path, dropped)
        elif self._dropping:
            self._dropping = False
            log.info("outbox %s: no longer dropping; %d messages (%d samples) dropped so far", self.path,
                     self._state.dropped_messages, self._state.dropped_samples)
        over = self._state.rows > self.limits.max_rows or self._state.bytes > self.limits.max_bytes
        if over and not self._over_limit:
            log.warning("outbox %s holds %d rows, %d bytes, over its limits, with nothing left to drop but messages "
                        "in flight: new telemetry is refused", self.path, self._state.rows, self._state.bytes)
        self._over_limit = over

    # ------------------------------------------------------------------ handing out and acking

    def take(self, limit: int) -> list[Message]:
        """The oldest messages not yet handed out, in id order, now counted as in flight.

        Returns at most ``limit`` and never more than keeps ``max_inflight`` unacknowledged.
        """
        with self._lock:
            messages = self.take_range(self._cursor, None, limit)
            if messages:
                self._cursor = messages[-1].id
            return messages

    def take_range(self, after: int, upto: int | None, limit: int) -> list[Message]:
        """Like :meth:`take`, for messages with ``after < id <= upto`` (no upper bound when None).

        The caller keeps its own cursors; :mod:`edge_agent.cloud.sync` uses two, one for the backlog
        found at connect (paced) and one for live messages, so live data is not stuck behind a
        long replay. Handed-out messages count as in flight here too, so they are never dropped.
        """
        with self._lock:
            room = min(limit, self.max_inflight - len(self._inflight))
            if room <= 0:
                return []
            where, params = "WHERE id > ?", [after]
            if upto is not None:
                where += " AND id <= ?"
                params.append(upto)
            try:
                rows = self.conn.execute(f"{_SELECT} {where} ORDER BY id LIMIT ?", (*params, room)).fetchall()
            except sqlite3.Error as exc:
                raise TwinError(f"{self.path}: cannot read the outbox: {exc}") from exc
            messages = [Message(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9]) for r in rows]
            for m in messages:
                self._inflight[m.id] = (m.kind, len(m.payload))
            return messages

    def release(self, ids: Iterable[int]) -> None:
        """Hand messages back unsent: they are pending again, no longer in flight."""
        with self._lock:
            for i in ids:
                self._inflight.pop(int(i), None)

    def last_id(self) -> int:
        """The id of the newest message stored (0 when empty)."""
        with self._lock:
            try:
                row = self.conn.execute("SELECT max(id) FROM messages").fetchone()
            except sqlite3.Error as exc:
                raise TwinError(f"{self.path}: cannot read the outbox: {exc}") from exc
            return int(row[0] or 0)

    def ack(self, ids: Iterable[int]) -> int:
        """Delete delivered messages (PUBACK received); return how many rows went.

        Unknown ids (already acked, or acked twice) are ignored.
        """
        id_list = [int(i) for i in ids]
        if not id_list:
            return 0
        with self._lock:
            with self._transaction("delete acknowledged messages") as state:
                gone = self.conn.execute(
                    "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) RETURNING kind, length(payload)",
                    (json.dumps(id_list),)).fetchall()
                for kind, size in gone:
                    state.rows -= 1
                    state.bytes -= size
                    if kind == "telemetry":
                        state.telemetry_rows -= 1
                        state.telemetry_bytes -= size
                    elif kind in EVENT_KINDS:
                        state.event_rows -= 1
                        state.event_bytes -= size
            for i in id_list:
                self._inflight.pop(i, None)
            self._freed_since_maintain += sum(size for _, size in gone)
            if self._freed_since_maintain >= self.maintain_every:
                self.maintain()
        return len(gone)

    def requeue(self) -> None:
        """Forget what is in flight (the link went down): everything not acked is pending again."""
        with self._lock:
            self._inflight.clear()
            self._cursor = 0

    @property
    def inflight(self) -> int:
        """How many messages are handed out and not yet acknowledged."""
        return len(self._inflight)

    # ------------------------------------------------------------------ housekeeping and stats

    def maintain(self) -> None:
        """Give free pages back to the file system and truncate the WAL.

        Pages freed by acks are reused by later appends anyway; this matters after a backlog
        drained. The checkpoint is skipped (not waited for) while a reader holds an old snapshot.
        """
        with self._lock:
            self._freed_since_maintain = 0
            try:
                free, total = (self.conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_count"))
                # Vacuuming moves the live pages at the end of the file into the free ones; waiting
                # until three quarters are free keeps that copying to about a third of a drained backlog.
                if free and free * 4 >= total * 3:
                    # executescript steps the pragma to completion; execute() would free one page
                    # (each step of incremental_vacuum frees one).
                    self.conn.executescript("PRAGMA incremental_vacuum;")
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                raise TwinError(f"{self.path}: cannot reclaim outbox space: {exc}") from exc

    def stats(self) -> OutboxStats:
        """Depth, bytes, age of the oldest message, drop counters and next seqs."""
        with self._lock:
            try:
                oldest = self.conn.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                raise TwinError(f"{self.path}: cannot read the outbox: {exc}") from exc
            s = self._state
            return OutboxStats(
                depth=s.rows, bytes=s.bytes, inflight=len(self._inflight),
                oldest_age_s=max(0.0, self._clock() - oldest[0]) if oldest else None,
                dropped_messages=s.dropped_messages, dropped_samples=s.dropped_samples,
                next_telemetry_seq=s.next_seq["telemetry"], next_event_seq=s.next_seq["event"],
                pending_gap=s.gap, file_bytes=sqlite.file_bytes(self.path), dropped_events=s.dropped_events,
                dropped_responses=s.dropped_responses, pending_event_gap=s.event_gap)
