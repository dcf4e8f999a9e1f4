"""One way to open and migrate every SQLite file of the agent: the twin, the outbox, the replay store.

:func:`connect` opens a file with the settings all of them share (autocommit mode so transactions
are explicit, a busy timeout, WAL for writers, read-only URIs for viewers) and maps every failure
to :class:`~edge_agent.errors.TwinError` naming the file. :func:`migrate` brings a file's schema
up to date: each step moves ``PRAGMA user_version`` one up, in its own transaction.

A step is SQL text (the early, hand-written schemas, kept as they shipped) or a function of a
``sqlite_utils.Database`` (``create``, ``transform``, ``create_index``, ``add_column``), so the
files are visibly sqlite-utils databases and later migrations need no hand-written DDL.

:func:`open_or_set_aside` is how the agent opens its files at start: a file that is corrupt, is
not a database, cannot be opened or is from a newer edge-agent is renamed with a timestamp
(``twin.db.corrupt-20260101T120000``, with its ``-wal`` and ``-shm``) and a fresh one is created,
so one bad file costs its own contents, kept for inspection, and never stops the agent. A file
that is merely locked by another process, or a full disk, is left alone: its data is fine.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edge_agent.errors import TwinError

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

Step = str | Callable[["sqlite_utils.Database"], None]
BUSY_TIMEOUT_MS = 5000
T = TypeVar("T")
_IMPORTING = threading.Lock()
# SQLite errors that say nothing bad about the file: another process holds a lock, the disk or
# memory is full. Such a file is kept as it is.
KEEP = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_NOMEM", "SQLITE_INTERRUPT"})


def connect(path: Path, what: str, *, readonly: bool = False, wal: bool = True,
            pragmas: Sequence[str] = ()) -> sqlite3.Connection:
    """Open ``path`` (``what`` names it in errors: "the twin", "the outbox", ...).

    Writers get the parent folder created, WAL mode (unless ``wal`` is false) and then each of
    ``pragmas`` ("synchronous = NORMAL", ...). A read-only connection never creates the file and
    never changes the journal mode, so a viewer cannot disturb the agent that writes it.
    """
    try:
        if readonly:
            if not path.exists():
                raise TwinError(f"{path}: no {what} yet (has the agent run with this config?)")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            for pragma in pragmas:
                conn.execute(f"PRAGMA {pragma}")
            if wal:
                conn.execute("PRAGMA journal_mode = WAL")
    except (sqlite3.Error, OSError) as exc:
        raise TwinError(f"{path}: cannot open {what}: {exc}") from exc
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (the connection is in autocommit mode)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        # SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR, ...); a second
        # ROLLBACK would raise and hide the real error
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def sqlite_utils_module() -> Any:
    """The sqlite_utils module, imported without numpy and pandas when they are not loaded already.

    sqlite-utils imports both, when installed, only to map their scalar types to column types,
    which the agent never stores. numpy alone costs a gateway without models about 16 MB of
    memory for its whole life; a model loads numpy anyway and then finds sqlite-utils working.
    """
    import sys

    # One thread at a time: another thread must not see the module half imported (replay store
    # migrations and viewers open their files from worker threads at the same time).
    with _IMPORTING:
        if "sqlite_utils" in sys.modules:
            return sys.modules["sqlite_utils"]
        masked = [name for name in ("numpy", "pandas") if name not in sys.modules]
        for name in masked:
            sys.modules[name] = None  # type: ignore[assignment]  # makes "import numpy" raise ImportError
        try:
            import sqlite_utils
        finally:
            for name in masked:
                if sys.modules.get(name) is None:
                    del sys.modules[name]
        return sqlite_utils


def migrate(conn: sqlite3.Connection, path: Path, steps: Sequence[Step], what: str) -> int:
    """Run the steps after the file's ``user_version``, one transaction each; returns the new version.

    A file from a newer edge-agent (a version above ``len(steps)``) is refused: its schema may
    mean things this version does not know.
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(steps):
        raise TwinError(f"{path}: {what} schema version {version} is newer than this edge-agent knows "
                        f"({len(steps)}); upgrade edge-agent")
    db: Any = None
    for number, step in enumerate(steps[version:], start=version + 1):
        with transaction(conn):
            if isinstance(step, str):
                for statement in step.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            else:
                if db is None:
                    db = sqlite_utils_module().Database(conn, execute_plugins=False)
                step(db)
            conn.execute(f"PRAGMA user_version = {number}")
        log.info("%s %s migrated to schema version %d", what, path, number)
        version = number
    return version


def query(conn: sqlite3.Connection, path: Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows as dicts; TwinError naming the file when the query fails."""
    try:
        cursor = conn.execute(sql, list(params))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]
    except sqlite3.Error as exc:
        raise TwinError(f"{path}: query failed: {exc}") from exc


def file_bytes(path: Path) -> int:
    """Size of the database file plus its WAL, as the disk sees it."""
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        with suppress(FileNotFoundError):  # no WAL right after a truncating checkpoint or close
            total += p.stat().st_size
    return total


def error_name(exc: BaseException) -> str | None:
    """The SQLite error name (``SQLITE_NOTADB``, ``SQLITE_FULL``, ...) behind ``exc``, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlite3.Error):
            return getattr(seen, "sqlite_errorname", None) or "SQLITE_ERROR"
        seen = seen.__cause__
    return None


def set_aside(path: Path, *, clock: Callable[[], float] = time.time) -> Path:
    """Rename ``path`` (and its ``-wal``, ``-shm``, ``-journal``) to ``<name>.corrupt-<UTC time>``.

    Returns the new path of the file itself."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock()))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    for suffix in ("-wal", "-shm", "-journal"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.replace(companion, target.with_name(target.name + suffix))
    return target


def open_or_set_aside(path: Path, opener: Callable[[Path], T], what: str) -> tuple[T, str | None]:
    """``opener(path)``; when that fails because of the file, set the file aside and open a fresh one.

    Returns the opened object and, when a file was set aside, a one-line notice for the log, an
    event and the status. A locked file or a full disk raises TwinError as it is (the data is fine).
    """
    try:
        return opener(path), None
    except TwinError as exc:
        if error_name(exc) in KEEP or not path.exists():
            raise
        try:
            moved = set_aside(path)
        except OSError as err:
            raise TwinError(f"{path}: {what} cannot be used ({exc}) and cannot be moved aside ({err})") from exc
        notice = (f"{what} {path} could not be used ({exc}); it was moved to {moved.name} and a fresh one "
                  "was started")
        log.error("%s", notice)
    return opener(path), notice
