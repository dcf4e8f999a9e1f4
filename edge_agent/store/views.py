"""The twin as its viewers see it: the CLI, remote queries, the demo summary (a sqlite-utils database).

:class:`TwinView` opens the twin file with a connection of its own (read-only for the CLI) and
answers the read-side questions with sqlite-utils; the agent's writer connection
(:class:`edge_agent.store.twin.Twin`) is never shared, so a query can neither run inside the
writer's transaction nor block it for longer than SQLite's WAL readers do.

:class:`TwinReader` keeps one read-write view open for the agent's remote commands, which query
from worker threads and acknowledge events (the one write a viewer makes).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edge_agent.errors import TwinError
from edge_agent.store import sqlite
from edge_agent.store.messages import Gap, OutboxStats
from edge_agent.store.outbox import META_COLUMNS, META_EVENT_COLUMNS
from edge_agent.store.twin import CURRENT

if TYPE_CHECKING:
    import sqlite_utils

T = TypeVar("T")

EVENT_COLUMNS = "id, ts, source, kind, state, score, equipment, message, detail, acked_by, acked_ts"

# One point's samples with ?2 <= ts <= ?3 (ts, value, quality), from both history tables, without
# unpacking every block in the window: a block holding the point contains "[<id>," (each sample
# starts so in the compact JSON the agent writes), which instr finds before json_each runs. Each
# half comes out in ts order, so ORDER BY ts merges them and a LIMIT stops early.
_POINT_SAMPLES = """
    WITH p AS (SELECT id, '[' || id || ',' AS key FROM history_points WHERE name = ?1)
    SELECT ts, value, quality FROM history_rows WHERE point = ?1 AND ts >= ?2 AND ts <= ?3
    UNION ALL
    SELECT b.ts, json_extract(s.value, '$[1]'), json_extract(s.value, '$[2]')
    FROM p, history_blocks AS b, json_each(b.samples) AS s
    WHERE b.ts >= ?2 AND b.ts <= ?3 AND instr(b.samples, p.key) > 0 AND json_extract(s.value, '$[0]') = p.id"""
# The same from a twin the agent has not migrated to schema 5 yet (history was a table)
_POINT_ROWS = "SELECT ts, value, quality FROM history WHERE point = ?1 AND ts >= ?2 AND ts <= ?3"
_COUNT = ("SELECT (SELECT count(*) FROM history_rows) + "
          "(SELECT coalesce(sum(json_array_length(samples)), 0) FROM history_blocks) AS n")


class TwinView:
    """Read-side queries on a twin file, through a connection of its own."""

    def __init__(self, db: sqlite_utils.Database, path: Path) -> None:
        self.db = db
        self.path = path
        self._blocks: bool | None = None  # whether history is in blocks (schema 5), once known

    @classmethod
    def open(cls, path: Path, *, readonly: bool = True) -> TwinView:
        """Open an existing twin; TwinError when there is none (or it cannot be read)."""
        if not path.exists():
            raise TwinError(f"{path}: no twin database yet (has the agent run with this config?)")
        conn = sqlite.connect(path, "the twin database", readonly=readonly, wal=False)
        return cls(sqlite.sqlite_utils_module().Database(conn, execute_plugins=False), path)

    def close(self) -> None:
        try:
            self.db.conn.close()
        except sqlite3.Error as exc:
            raise TwinError(f"{self.path}: close failed: {exc}") from exc

    def __enter__(self) -> TwinView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        try:
            return list(self.db.query(sql, list(params)))
        except sqlite3.Error as exc:
            raise TwinError(f"{self.path}: query failed: {exc}") from exc

    @staticmethod
    def _newest(sql: str, params: list[Any], limit: int | None) -> tuple[str, list[Any]]:
        """``sql`` (ordered by id) cut to its newest ``limit`` rows, still oldest first."""
        if limit is None:
            return sql, params
        return f"SELECT * FROM ({sql} DESC LIMIT ?) ORDER BY id", [*params, limit]

    # ------------------------------------------------------------------ reads

    def current(self) -> list[dict[str, Any]]:
        """Every point: name, device, value, quality, ts (source), received_ts, unit."""
        return self._rows(CURRENT)

    def point_names(self) -> set[str]:
        return {row["name"] for row in self._rows("SELECT name FROM points")}

    def history(self, point: str, since: float, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Samples of one point at or after ``since`` (unix seconds), oldest first."""
        sql = f"{self._point_samples()} ORDER BY ts LIMIT ?4"
        return self._rows(sql, [point, since, math.inf, -1 if limit is None else limit])

    def history_count(self) -> int:
        """Samples in history: the rows, and each block's length (no block is unpacked)."""
        sql = _COUNT if self._has_blocks() else "SELECT count(*) AS n FROM history"
        return int(self._rows(sql)[0]["n"])

    def _point_samples(self) -> str:
        return _POINT_SAMPLES if self._has_blocks() else _POINT_ROWS

    def _has_blocks(self) -> bool:
        """Whether the file has history in blocks; a file only moves forward, so asked once (when true)."""
        if not self._blocks:
            rows = self._rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'history_blocks'")
            self._blocks = bool(rows)
        return self._blocks

    def events(self, since: float = 0.0, *, limit: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """Events at or after ``since`` (of one ``kind``), the newest ``limit``, oldest first; ``detail`` decoded.

        Without a limit every matching row is loaded: viewers that may meet many use :meth:`iter_events`.
        """
        return list(self.iter_events(since, limit=limit, kind=kind))

    def iter_events(self, since: float = 0.0, *, limit: int | None = None, kind: str | None = None,
                    ) -> Iterator[dict[str, Any]]:
        """Like :meth:`events`, one row at a time from the cursor (memory stays flat for any number)."""
        where = "ts >= ?"
        params: list[Any] = [since]
        if kind is not None:
            where += " AND kind = ?"
            params.append(kind)
        sql, params = self._newest(f"SELECT {EVENT_COLUMNS} FROM events WHERE {where} ORDER BY id", params, limit)
        for row in self._iter(sql, params):
            row["detail"] = _detail(row["detail"])
            yield row

    def writes(self, since: float = 0.0, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Write attempts at or after ``since``, the newest ``limit``, oldest first."""
        return list(self.iter_writes(since, limit=limit))

    def iter_writes(self, since: float = 0.0, *, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Like :meth:`writes`, one row at a time from the cursor."""
        sql, params = self._newest("SELECT * FROM writes WHERE ts >= ? ORDER BY id", [since], limit)
        yield from self._iter(sql, params)

    def _iter(self, sql: str, params: list[Any]) -> Iterator[dict[str, Any]]:
        try:
            cursor = self.db.conn.execute(sql, params)
            names = [d[0] for d in cursor.description]
            for row in cursor:
                yield dict(zip(names, row, strict=True))
        except sqlite3.Error as exc:
            raise TwinError(f"{self.path}: query failed: {exc}") from exc

    def trend(self, point: str, since: float, until: float, buckets: int, *,
              budget: float = 2.0) -> list[dict[str, Any]]:
        """A chart's worth of one point's numeric history: at most ``buckets`` rows, each the average, min,
        max and count of the samples in one equal slice of ``since..until`` (bounded for the web page).

        The query may scan many samples of other points (history is indexed by time only), so it gets
        ``budget`` seconds of SQLite's time; past that it is interrupted and TwinError says so.
        """
        width = max((until - since) / max(buckets, 1), 1e-3)
        sql = ("SELECT CAST((ts - ?2) / ?4 AS INTEGER) AS bucket, min(ts) AS first_ts, max(ts) AS last_ts, "
               "avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS n "
               f"FROM ({self._point_samples()}) WHERE typeof(value) IN ('integer', 'real') "
               "GROUP BY bucket ORDER BY bucket")
        deadline = time.monotonic() + budget
        conn = self.db.conn
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        try:
            return self._rows(sql, [point, since, until, width])
        except TwinError as exc:
            if "interrupted" in str(exc):
                raise TwinError(f"{self.path}: the history of {point} over this range takes more than "
                                f"{budget:g} s to read; choose a shorter range") from exc
            raise
        finally:
            conn.set_progress_handler(None, 0)

    def desired(self) -> list[dict[str, Any]]:
        """The desired state of every point that was ever requested."""
        return list(self.db["desired"].rows_where(order_by="point"))

    # ------------------------------------------------------------------ the one write

    def ack_event(self, event_id: int, operator: str, now: float) -> dict[str, Any] | None:
        """Mark an event acknowledged (the first ack wins); None when there is no such event."""
        try:
            with sqlite.transaction(self.db.conn) as conn:
                row = conn.execute("SELECT acked_by, acked_ts FROM events WHERE id = ?", (event_id,)).fetchone()
                if row is None:
                    return None
                already = row[0] is not None
                if not already:
                    conn.execute("UPDATE events SET acked_by = ?, acked_ts = ? WHERE id = ?",
                                 (operator, now, event_id))
                    row = (operator, now)
        except sqlite3.Error as exc:
            raise TwinError(f"{self.path}: cannot acknowledge event {event_id}: {exc}") from exc
        return {"event": event_id, "acked_by": row[0], "acked_ts": row[1], "already_acked": already}


def _detail(text: str | None) -> dict[str, Any]:
    """An event's ``detail`` column decoded (a row someone edited into non-JSON comes back as text)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


class TwinReader:
    """One read-write :class:`TwinView` for the agent's remote commands, opened on first use (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._view: TwinView | None = None

    def call(self, fn: Callable[[TwinView], T]) -> T:
        """Run ``fn`` on the view (blocking: call from a worker thread)."""
        with self._lock:
            if self._view is None:
                self._view = TwinView.open(self.path, readonly=False)
            return fn(self._view)

    def close(self) -> None:
        with self._lock:
            if self._view is not None:
                view, self._view = self._view, None
                view.close()


# --------------------------------------------------------------------------- the outbox


def read_stats(path: Path, *, clock: Callable[[], float] = time.time) -> OutboxStats:
    """Stats of an outbox file another process (the agent) may be writing: opened read-only."""
    if not path.exists():
        raise TwinError(f"{path}: no outbox yet (has the agent run with MQTT configured?)")
    conn = sqlite.connect(path, "the outbox", readonly=True)
    try:
        try:
            meta = conn.execute(f"SELECT {META_COLUMNS}, {META_EVENT_COLUMNS} FROM meta").fetchone()
        except sqlite3.OperationalError:  # a file the agent has not migrated to schema 3 yet
            meta = (*conn.execute(f"SELECT {META_COLUMNS} FROM meta").fetchone(), 0, 0, None, None, 0)
        depth, size, oldest = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), min(created) FROM messages").fetchone()
    except sqlite3.Error as exc:
        raise TwinError(f"{path}: cannot read the outbox: {exc}") from exc
    finally:
        conn.close()
    gap = Gap(meta[4], meta[5], meta[6], meta[7]) if meta[4] is not None else None
    return OutboxStats(depth=depth, bytes=size, inflight=0,
                       oldest_age_s=max(0.0, clock() - oldest) if oldest is not None else None,
                       dropped_messages=meta[2], dropped_samples=meta[3], next_telemetry_seq=meta[0],
                       next_event_seq=meta[1], pending_gap=gap, file_bytes=sqlite.file_bytes(path),
                       dropped_events=meta[8], dropped_responses=meta[9],
                       pending_event_gap=Gap(meta[10], meta[11], meta[12], 0) if meta[10] is not None else None)
