"""The SQLite twin: schema, batches, deadband, retention, and surviving kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivers.base import DeviceRead, Reading
from edge_agent import config
from edge_agent.errors import TwinError
from edge_agent.store.twin import MIGRATIONS, Twin
from edge_agent.store.views import TwinView
from tests import builders
from tests.helpers import wait_for_sync


def _config(tmp_path: Path, deadband: float = 0.0) -> config.AgentConfig:
    points = [builders.point("pump1.flow", address=0, type="float32", unit="m3/h", deadband=deadband),
              builders.point("pump1.speed", address=2)]
    return builders.load(builders.config(tmp_path, devices=[builders.modbus("pump1", points)]), tmp_path / "agent.toml")


def test_schema_wal_and_current_values(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    assert twin.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert twin.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    first = [Reading("pump1.flow", 12.5, "good", 100.0), Reading("pump1.speed", 1450, "good", 100.0)]
    twin.write_batch([(100.5, first),
                      (101.5, [Reading("pump1.flow", 13.0, "good", 101.0)])])
    rows = {r["name"]: r for r in twin.current()}
    assert rows["pump1.flow"] == {"name": "pump1.flow", "device": "pump1", "value": 13.0, "quality": "good",
                                  "ts": 101.0, "received_ts": 101.5, "unit": "m3/h"}
    assert rows["pump1.speed"]["value"] == 1450
    assert [r["value"] for r in _history(cfg.twin_path, "pump1.flow")] == [12.5, 13.0]
    twin.close()


@pytest.mark.parametrize("kind", ["readings", "device read"])
def test_current_values_land_on_their_own_rows_when_another_tool_renumbered_the_points_table(
        tmp_path: Path, kind: str) -> None:
    """Current values are updated by rowid; rowids that changed under the agent (a VACUUM, a
    tool rewriting the table) never put a value on another point's row. A device read's rowids
    are kept per read's points, and read again with the rest."""
    cfg = _config(tmp_path)
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)

    def read(value: float, ts: float) -> list[Reading] | DeviceRead:
        if kind == "device read":
            return DeviceRead(("pump1.flow", "pump1.speed"), (value, int(value * 10)), "good", ts)
        return [Reading("pump1.flow", value, "good", ts), Reading("pump1.speed", int(value * 10), "good", ts)]

    twin.write_batch([(1.5, read(1.0, 1.0))])
    with sqlite3.connect(cfg.twin_path) as other:  # swap the two rows' rowids
        ids = dict(other.execute("SELECT name, rowid FROM points"))
        other.execute("UPDATE points SET rowid = -1 WHERE name = 'pump1.flow'")
        other.execute("UPDATE points SET rowid = ? WHERE name = 'pump1.speed'", (ids["pump1.flow"],))
        other.execute("UPDATE points SET rowid = ? WHERE name = 'pump1.flow'", (ids["pump1.speed"],))
    other.close()
    twin.write_batch([(2.5, read(2.0, 2.0))])
    assert {r["name"]: (r["value"], r["ts"]) for r in twin.current()} == {"pump1.flow": (2.0, 2.0),
                                                                          "pump1.speed": (20, 2.0)}
    twin.write_batch([(3.5, read(3.0, 3.0))])
    assert {r["name"]: r["value"] for r in twin.current()} == {"pump1.flow": 3.0, "pump1.speed": 30}
    # and the rowids kept for the read's points are the new ones (not a slow update by name each time)
    assert twin._rowids_of(("pump1.flow", "pump1.speed")) == (ids["pump1.speed"], ids["pump1.flow"])
    # a read with a point the table does not hold: the others are updated, nothing else is added
    twin.write_batch([(4.5, DeviceRead(("pump1.flow", "gone.point"), (4.0, 1.0), "good", 4.0))])
    assert {r["name"]: r["value"] for r in twin.current()} == {"pump1.flow": 4.0, "pump1.speed": 30}
    twin.close()


@pytest.mark.parametrize("kind", ["readings", "device read"])
def test_an_integer_past_64_bits_is_stored_as_a_real_and_writing_goes_on(tmp_path: Path, kind: str) -> None:
    """A uint64 register past 2**63 (a device's reply SQLite cannot hold as an INTEGER) used to
    fail every flush with OverflowError; now points and history both keep it as a REAL."""
    points = [builders.point("meter.total", address=0, type="uint64"), builders.point("meter.flow", address=4)]
    cfg = builders.load(builders.config(tmp_path, devices=[builders.modbus("meter", points)]), tmp_path / "agent.toml")
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    for ts, total in ((1.0, 2**64 - 1), (2.0, 2**63), (3.0, 7)):
        values = (total, int(ts))
        read: list[Reading] | DeviceRead = (
            DeviceRead(("meter.total", "meter.flow"), values, "good", ts) if kind == "device read"
            else [Reading(n, v, "good", ts) for n, v in zip(("meter.total", "meter.flow"), values, strict=True)])
        twin.write_batch([(ts + 0.5, read)])
        current = {r["name"]: r["value"] for r in twin.current()}
        assert current == {"meter.total": total if total < 2**63 else float(total), "meter.flow": int(ts)}
    history = twin.conn.execute("SELECT value FROM history WHERE point = 'meter.total' ORDER BY ts").fetchall()
    assert history == [(float(2**64 - 1),), (float(2**63),), (7,)]
    twin.close()


def test_a_text_with_lone_surrogates_is_stored_readable_and_writing_goes_on(tmp_path: Path) -> None:
    """A str with lone surrogates (bytes that were not UTF-8, decoded with surrogateescape) from
    any source: SQLite refuses it as a parameter (the points update failed every flush) and its
    JSON escape would give history a TEXT no reader can decode. Both now hold U+FFFD."""
    cfg = _config(tmp_path)
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    text = b"\xb0C".decode("utf-8", "surrogateescape")
    twin.write_batch([(1.5, [Reading("pump1.speed", text, "good", 1.0)])])
    twin.write_batch([(2.5, [Reading("pump1.speed", 5, "good", 2.0)])])
    assert [r["value"] for r in _history(cfg.twin_path, "pump1.speed")] == ["\ufffdC", 5]
    twin.write_batch([(3.5, [Reading("pump1.speed", text, "good", 3.0)])])
    assert {r["name"]: r["value"] for r in twin.current()}["pump1.speed"] == "\ufffdC"
    twin.close()


def test_an_unforeseen_error_while_storing_is_a_twin_error_and_nothing_half_stored(tmp_path: Path) -> None:
    """Whatever goes wrong inside a batch (here the points update raising what no known input
    raises now) rolls the batch back and comes out as a TwinError, which the writer survives:
    it keeps the readings and stores them, once, at the next flush."""

    class Flaky(Twin):
        fail = True

        def _update_points(self, conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
            if self.fail:
                self.fail = False
                raise ValueError("no such value")
            super()._update_points(conn, rows)

    cfg = _config(tmp_path)
    plain = Twin.open(cfg.twin_path)
    plain.sync_points(cfg)
    twin = Flaky(plain.conn, plain.path)
    chunk = [(1.5, DeviceRead(("pump1.flow", "pump1.speed"), (1.0, 10), "good", 1.0))]
    with pytest.raises(TwinError, match=r"cannot store readings: ValueError: no such value"):
        twin.write_batch(chunk)
    assert _history(cfg.twin_path, "pump1.flow") == []  # rolled back
    assert len(twin.write_batch(chunk)) == 2
    assert [r["value"] for r in _history(cfg.twin_path, "pump1.flow")] == [1.0]
    assert {r["name"]: r["value"] for r in twin.current()} == {"pump1.flow": 1.0, "pump1.speed": 10}
    plain.close()


def test_deadband_keeps_only_moves_beyond_it_and_quality_changes(tmp_path: Path) -> None:
    cfg = _config(tmp_path, deadband=0.5)
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    values = [(10.0, "good"), (10.3, "good"), (10.6, "good"), (10.6, "bad"), (10.6, "good"), (9.9, "good")]
    twin.write_batch([(float(i), [Reading("pump1.flow", v, q, float(i))]) for i, (v, q) in enumerate(values)])
    kept = [(r["value"], r["quality"]) for r in _history(cfg.twin_path, "pump1.flow")]
    assert kept == [(10.0, "good"), (10.6, "good"), (10.6, "bad"), (10.6, "good"), (9.9, "good")]
    # the current value always follows the latest reading, deadband or not
    assert {r["name"]: r["value"] for r in twin.current()}["pump1.flow"] == 9.9
    twin.close()


def test_prune_removes_only_old_history(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    twin.write_batch([(0.0, [Reading("pump1.flow", float(i), "good", float(i)) for i in range(100)])])
    assert twin.prune(before=60.0, chunk=7) == 60
    assert [r["ts"] for r in _history(cfg.twin_path, "pump1.flow")] == [float(i) for i in range(60, 100)]
    twin.close()


def test_removed_point_leaves_points_table(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    smaller = builders.load(builders.config(tmp_path, id=None, devices=[
        builders.modbus("pump1", [builders.point("pump1.speed", address=2)])]), cfg.source)
    twin.sync_points(smaller)
    with TwinView.open(cfg.twin_path) as view:
        assert view.point_names() == {"pump1.speed"}
    twin.close()


def test_readonly_open_of_missing_twin_names_the_file(tmp_path: Path) -> None:
    from edge_agent.errors import TwinError

    try:
        TwinView.open(tmp_path / "nope.db")
    except TwinError as exc:
        assert "nope.db" in str(exc)
    else:
        raise AssertionError("expected TwinError")


WRITER = """
import sys, time
from drivers.base import DeviceRead, Reading
from edge_agent import config
from edge_agent.store.twin import Twin
cfg = config.load(sys.argv[1])
twin = Twin.open(cfg.twin_path)
twin.sync_points(cfg)
n = 0
print("ready", flush=True)
while True:
    n += 1
    twin.write_batch([(time.time(), [Reading(f"p{i}", n, "good", time.time()) for i in range(50)])])
"""


def test_twin_survives_kill_9_during_writes(tmp_path: Path) -> None:
    """Kill the writer mid-stream many times: the file always reopens clean, batches whole."""
    db = tmp_path / "twin.db"
    doc = builders.config(tmp_path, id=None, devices=[builders.modbus("d", builders.numbered("p", 50))])
    config_file = builders.write(doc, tmp_path / "agent.toml")
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(config_file)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        before = _rows(db) if attempt else 0
        wait_for_sync(lambda b=before: _rows(db) > b + 500, timeout=20, what="writer progress")  # type: ignore[misc]
        time.sleep(0.01 * attempt)  # vary the instant of the kill (not a wait for a condition)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        twin = Twin.open(db)
        assert twin.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = twin.conn.execute("SELECT count(*) FROM history").fetchone()[0]
        assert rows % 50 == 0, "a batch was stored partially"
        # every point's current value is from the last whole batch
        values = {r["value"] for r in twin.current()}
        assert len(values) == 1
        twin.close()


def _history(path: Path, point: str) -> list[dict[str, object]]:
    with TwinView.open(path) as view:
        return view.history(point, 0)


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM history").fetchone()[0])
    except sqlite3.Error:
        return 0
