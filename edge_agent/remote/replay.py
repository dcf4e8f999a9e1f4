"""The replay store: ids of accepted commands, kept past their expiry across restarts."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.errors import TwinError
from edge_agent.remote.envelope import Envelope
from edge_agent.store import sqlite

if TYPE_CHECKING:
    import sqlite_utils

REPLAY_FILE = "commands.db"
REPLAY_MARGIN = 86400.0  # ids are kept this long after expires_at + clock_skew


def _seen(db: sqlite_utils.Database) -> None:
    # if_not_exists: stores written before schema versions were kept have the table already
    db.table("seen").create({"id": str, "operator": str, "name": str, "expires_at": float, "received": float},
                      pk="id", not_null={"operator", "name", "expires_at", "received"}, if_not_exists=True)


def _per_operator(db: sqlite_utils.Database) -> None:
    # Ids are an operator's own: with one namespace for everybody, a viewer who saw an admin's id
    # first (audit records are on the events topic) could send it under their own name and burn it.
    db.table("seen").transform(pk=("operator", "id"))


def _meta(db: sqlite_utils.Database) -> None:
    # "floor": commands issued before it are refused as replayed; set when a broken store was set
    # aside, since the ids it held (of commands that may still be valid) are gone with it.
    db.table("meta").create({"key": str, "value": float}, pk="key", if_not_exists=True)


# Each entry moves the schema one version up (PRAGMA user_version). Append, never edit.
MIGRATIONS: list[sqlite.Step] = [_seen, _per_operator, _meta]


class ReplayStore:
    """Ids of accepted commands per operator, in ``data_dir/commands.db``, kept past their expiry across restarts.

    An id is claimed (committed) before its command runs, so a crash mid-command cannot make
    it usable again. Ids are removed ``REPLAY_MARGIN`` s after they could no longer pass the
    expiry check anyway. A store that cannot be used is set aside and a fresh one started
    (``notice`` says so); commands issued before that moment are then refused as replayed, since
    nothing remembers whether they ran. Thread-safe; call from a worker thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._claims = 0
        self._conn: sqlite3.Connection | None = None
        self._floor = 0.0
        self.notice: str | None = None  # set when a broken store was set aside

    def _connect(self, path: Path) -> sqlite3.Connection:
        conn = sqlite.connect(path, "the command replay store")
        try:
            sqlite.migrate(conn, path, MIGRATIONS, "replay store")
        except (sqlite3.Error, TwinError) as exc:
            conn.close()
            raise TwinError(f"{path}: cannot open the command replay store: {exc}") from exc
        return conn

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            conn, notice = sqlite.open_or_set_aside(self.path, self._connect, "the command replay store")
            try:
                if notice is not None:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('floor', ?)", (time.time(),))
                    self.notice = notice + "; commands issued before now are refused as replayed"
                row = conn.execute("SELECT value FROM meta WHERE key = 'floor'").fetchone()
            except sqlite3.Error as exc:
                conn.close()
                raise TwinError(f"{self.path}: cannot open the command replay store: {exc}") from exc
            self._floor = float(row[0]) if row else 0.0
            self._conn = conn
        return self._conn

    def open(self) -> None:
        """Open the store now (else the first claim does)."""
        with self._lock:
            self._open()

    def claim(self, envelope: Envelope, keep_until: float, now: float) -> bool:
        """Record (operator, id); False when this operator used the id before. A store that cannot be
        written refuses (TwinError)."""
        with self._lock:
            conn = self._open()
            if envelope.issued_at < self._floor:
                return False
            try:
                cur = conn.execute("INSERT OR IGNORE INTO seen (id, operator, name, expires_at, received) "
                                   "VALUES (?, ?, ?, ?, ?)",
                                   (envelope.id, envelope.operator, envelope.name, keep_until, now))
                self._claims += 1
                if self._claims % 100 == 1:
                    conn.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
            except sqlite3.Error as exc:
                raise TwinError(f"{self.path}: cannot record command {envelope.id!r}: {exc}") from exc
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
