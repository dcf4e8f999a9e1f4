"""History in blocks (issue 13): the ``history`` view answers as the old table did.

Each test that compares builds two real files from the same readings: a twin of schema 4 (the
``history`` table, written the way edge-agent wrote it before blocks: one INSERT per reading) and
a twin of today's schema (``Twin.write_batch``, blocks), then asks both the same questions.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from drivers.base import DeviceRead, Reading
from edge_agent.errors import TwinError
from edge_agent.store import floats, sqlite
from edge_agent.store.twin import MIGRATIONS, Chunk, Twin
from edge_agent.store.views import TwinView
from tests import builders

OLD_VERSION = 4  # the last schema with history as a table
# What edge-agent 4 ran: its writer's insert, TwinView.history and TwinView.trend
OLD_INSERT = "INSERT INTO history (point, value, quality, ts) VALUES (?, ?, ?, ?)"
OLD_HISTORY = "SELECT ts, value, quality FROM history WHERE point = ? AND ts >= ? ORDER BY ts"
OLD_TREND = ("SELECT CAST((ts - ?) / ? AS INTEGER) AS bucket, min(ts) AS first_ts, max(ts) AS last_ts, "
             "avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS n FROM history "
             "WHERE point = ? AND ts >= ? AND ts <= ? AND typeof(value) IN ('integer', 'real') "
             "GROUP BY bucket ORDER BY bucket")

ODD_VALUES: list[Any] = [1.5, -0.0, 1e300, 7, -12, 2**62, True, False, "", "on", 'q"uote\\ é ✓', "3.5", None,
                         math.nan, math.inf, -math.inf, 0.1 + 0.2, 5e-324]


def old_twin(path: Path) -> sqlite3.Connection:
    """A twin file at schema 4, built by the migrations as they shipped (autocommit connection)."""
    conn = sqlite.connect(path, "the old twin")
    assert sqlite.migrate(conn, path, MIGRATIONS[:OLD_VERSION], "twin") == OLD_VERSION
    return conn


def old_write(conn: sqlite3.Connection, chunks: Sequence[Chunk]) -> None:
    with sqlite.transaction(conn):
        conn.executemany(OLD_INSERT, [r for _, readings in chunks for r in readings])


def plant_chunks(seed: int, reads: int = 300) -> list[Chunk]:
    """Device reads of 3 devices: each read gives its points one ts; values of every kind; some reads
    with two timestamps in them (two runs), and two devices read at the same instant."""
    rng = random.Random(seed)
    devices = {f"d{d}": [f"d{d}.p{i}" for i in range(8)] for d in range(3)}
    chunks: list[Chunk] = []
    ts = 1000.0
    for n in range(reads):
        device = f"d{n % 3}"
        if n % 3:
            ts += rng.choice((0.25, 0.5, 1.0))
        readings = []
        for i, name in enumerate(devices[device]):
            value: Any = rng.choice(ODD_VALUES) if i == 0 else rng.uniform(-50.0, 50.0)
            if i == 1:
                value = rng.randint(0, 3000)
            readings.append(Reading(name, value, rng.choice(("good", "good", "bad", "uncertain")), ts))
        if n % 7 == 0:  # a read split in two runs of timestamps
            readings = [r._replace(ts=ts + 0.125) if i >= 5 else r for i, r in enumerate(readings)]
        chunks.append((ts + 0.01, readings))
    return chunks


def both(tmp_path: Path, chunks: Sequence[Chunk]) -> tuple[sqlite3.Connection, Twin]:
    old = old_twin(tmp_path / "old.db")
    old_write(old, chunks)
    new = Twin.open(tmp_path / "new.db")
    for start in range(0, len(chunks), 40):  # flush-sized batches
        new.write_batch(chunks[start:start + 40])
    return old, new


def same(a: Any, b: Any) -> bool:
    """Rows equal value for value and type (-0.0 and 0.0 told apart; NULLs equal)."""
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


def test_the_view_answers_point_and_time_windows_as_the_table_did(tmp_path: Path) -> None:
    chunks = plant_chunks(1)
    old, new = both(tmp_path, chunks)
    queries = [
        ("SELECT point, value, typeof(value), quality, ts FROM history WHERE point = ? AND ts > ? ORDER BY ts",
         [("d0.p0", 0.0), ("d1.p0", 1100.0), ("d2.p1", 1200.5), ("d1.p7", 1000.0), ("nope", 0.0)]),
        ("SELECT point, value, typeof(value), quality, ts FROM history WHERE ts >= ? AND ts < ? ORDER BY ts, point",
         [(1050.0, 1060.0), (0.0, 5000.0)]),
        ("SELECT point, count(*), sum(typeof(value) = 'null'), min(ts), max(ts) FROM history GROUP BY point "
         "ORDER BY point", [()]),
        ("SELECT value, typeof(value) FROM history WHERE point = 'd0.p0' ORDER BY ts DESC LIMIT 20", [()]),
    ]
    try:
        for sql, cases in queries:
            for params in cases:
                want = old.execute(sql, params).fetchall()
                got = new.conn.execute(sql, params).fetchall()
                assert same(got, want), (sql, params)
        # every kind of value came through, with the type the old table gave it
        kinds = dict(new.conn.execute("SELECT DISTINCT typeof(value), 1 FROM history WHERE point LIKE '%.p0'"))
        assert kinds.keys() == {"real", "integer", "text", "null"}
        assert new.conn.execute("SELECT count(*) FROM history").fetchone()[0] == sum(len(r) for _, r in chunks)
    finally:
        old.close()
        new.close()


def test_values_of_every_kind_round_trip_as_the_table_stored_them(tmp_path: Path) -> None:
    readings = [Reading(f"v.{i}", value, "good", 10.0) for i, value in enumerate(ODD_VALUES)]
    old, new = both(tmp_path, [(10.5, readings)])
    try:
        sql = "SELECT value, typeof(value) FROM history WHERE point = ?"
        for i, value in enumerate(ODD_VALUES):
            got = new.conn.execute(sql, (f"v.{i}",)).fetchall()
            assert same(got, old.execute(sql, (f"v.{i}",)).fetchall()), value
        rows = dict(new.conn.execute("SELECT point, value FROM history"))
        assert rows["v.13"] is None  # NaN: NULL, as SQLite stored it before
        assert rows["v.14"] == math.inf and rows["v.15"] == -math.inf
        assert rows["v.6"] == 1 and rows["v.7"] == 0  # booleans: 1 and 0, as before
        assert rows["v.10"] == 'q"uote\\ é ✓' and rows["v.11"] == "3.5"
        # one block, JSON SQLite accepts
        assert new.conn.execute("SELECT count(*), sum(json_valid(samples)) FROM history_blocks").fetchone() == (1, 1)
    finally:
        old.close()
        new.close()


def test_floats_come_back_bit_for_bit(tmp_path: Path) -> None:
    rng = random.Random(5)
    values = [rng.uniform(-1e6, 1e6) for _ in range(3000)] + [rng.random() * 10.0 ** rng.randint(-300, 300)
                                                               for _ in range(3000)]
    twin = Twin.open(tmp_path / "twin.db")
    try:
        twin.write_batch([(0.0, [Reading(f"f.{i % 50}", v, "good", float(i // 50)) for i, v in enumerate(values)])])
        got = [row[0] for row in twin.conn.execute("SELECT value FROM history ORDER BY ts, CAST(substr(point, 3) "
                                                   "AS INTEGER)")]
    finally:
        twin.close()
    assert got == values


def test_viewers_get_the_same_history_and_trend_from_blocks(tmp_path: Path) -> None:
    chunks = plant_chunks(2, reads=600)
    old, new = both(tmp_path, chunks)
    new.close()
    try:
        with TwinView.open(tmp_path / "new.db") as view:
            for point, since in [("d0.p0", 0.0), ("d1.p2", 1100.0), ("d2.p7", 1300.0), ("unknown", 0.0)]:
                want = [dict(zip(("ts", "value", "quality"), row, strict=True))
                        for row in old.execute(OLD_HISTORY, (point, since))]
                assert same(view.history(point, since), want), point
                assert same(view.history(point, since, limit=5), want[:5])
                for until, buckets in [(1500.0, 50), (1200.0, 7), (since + 0.5, 3)]:
                    width = max((until - since) / buckets, 1e-3)
                    cursor = old.execute(OLD_TREND, (since, width, point, since, until))
                    names = [d[0] for d in cursor.description]
                    want_trend = [dict(zip(names, row, strict=True)) for row in cursor]
                    assert same(view.trend(point, since, until, buckets), want_trend), (point, until)
            assert view.history_count() == sum(len(r) for _, r in chunks)
            assert view.history("d0.p3", 0.0)  # a point that has samples
    finally:
        old.close()


def test_history_queries_use_the_ts_indexes(tmp_path: Path) -> None:
    twin = Twin.open(tmp_path / "twin.db")
    try:
        twin.write_batch(plant_chunks(3, reads=20))
        for sql in ("SELECT point, value, quality, ts FROM history WHERE point = ? AND ts > ?",
                    "SELECT point, value, quality, ts FROM history WHERE point = ? AND ts > ? ORDER BY ts"):
            plan = " | ".join(row[3] for row in twin.conn.execute(f"EXPLAIN QUERY PLAN {sql}", ("d0.p1", 1005.0)))
            assert "history_rows USING INDEX history_ts (ts>?)" in plan, plan
            assert "USING INDEX history_blocks_ts (ts>?)" in plan, plan
            assert "SCAN b" not in plan and "SCAN history_blocks" not in plan, plan
        rows = twin.conn.execute("SELECT ts FROM history WHERE point = 'd0.p1' AND ts > 1005 ORDER BY ts").fetchall()
        assert rows and [r[0] for r in rows] == sorted(r[0] for r in rows)
    finally:
        twin.close()


def test_a_schema_4_twin_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "twin.db"
    old = old_twin(path)
    before = plant_chunks(4, reads=30)
    old_write(old, before)
    old.close()
    with TwinView.open(path) as view:  # a viewer of the file before the agent migrates it
        assert view.history_count() == 30 * 8
        assert [r["ts"] for r in view.history("d1.p1", 0.0)] == [r.ts for _, rs in before for r in rs
                                                                  if r.point == "d1.p1"]
    twin = Twin.open(path)
    try:
        assert twin.conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 5
        tables = {row[0]: row[1] for row in twin.conn.execute("SELECT name, type FROM sqlite_master")}
        assert tables["history"] == "view" and tables["history_rows"] == "table"
        assert tables["history_ts"] == "index" and tables["history_blocks_ts"] == "index"
        assert twin.conn.execute("SELECT count(*) FROM history_rows").fetchone()[0] == 30 * 8
        after = [(ts + 100.0, [r._replace(ts=r.ts + 100.0) for r in rs]) for ts, rs in plant_chunks(4, reads=30)]
        twin.write_batch(after)
        assert twin.conn.execute("SELECT count(*) FROM history_rows").fetchone()[0] == 30 * 8  # new: in blocks
        assert twin.conn.execute("SELECT count(*) FROM history_blocks").fetchone()[0] == 30 + 5  # reads 0, 7, ... split
    finally:
        twin.close()
    want = [(r.ts, r.value) for _, rs in [*before, *after] for r in rs if r.point == "d1.p1"]
    with TwinView.open(path) as view:
        assert [(r["ts"], r["value"]) for r in view.history("d1.p1", 0.0)] == want
        assert [(r["ts"], r["value"]) for r in view.history("d1.p1", 0.0, limit=12)] == want[:12]
        assert view.history_count() == 2 * 30 * 8
        count = view.db.conn.execute("SELECT count(*) FROM history WHERE point = 'd1.p1' AND ts > 1000").fetchone()
        assert count[0] == len(want)


def test_deadband_applies_per_reading_and_blocks_follow_the_timestamps(tmp_path: Path) -> None:
    points = [builders.point("d.a", address=0, type="float32", deadband=1.0), builders.point("d.b", address=2)]
    cfg = builders.load(builders.config(tmp_path, devices=[builders.modbus("d", points)]), tmp_path / "agent.toml")
    twin = Twin.open(cfg.twin_path)
    try:
        twin.sync_points(cfg)
        reads = [(10.0, 5), (10.5, 6), (11.5, 7), (11.0, 8)]  # d.a moves 0.5 (dropped), 1.5, 0.5 (dropped)
        chunks: list[Chunk] = [(float(t), [Reading("d.a", a, "good", float(t)), Reading("d.b", b, "good", float(t))])
                               for t, (a, b) in enumerate(reads)]
        kept = twin.write_batch(chunks)
        assert [(r.point, r.value) for r in kept] == [("d.a", 10.0), ("d.b", 5), ("d.b", 6), ("d.a", 11.5),
                                                      ("d.b", 7), ("d.b", 8)]
        assert [(r[0], r[1]) for r in twin.conn.execute("SELECT ts, json_array_length(samples) FROM history_blocks "
                                                         "ORDER BY rowid")] == [(0.0, 2), (1.0, 1), (2.0, 2), (3.0, 1)]
        # a chunk whose readings carry several timestamps: one block per run of equal ts
        mixed = [Reading("d.b", i, "good", ts) for i, ts in enumerate([20.0, 20.0, 21.0, 20.0, 20.0])]
        twin.write_batch([(22.0, mixed)])
        runs = twin.conn.execute("SELECT ts, json_array_length(samples) FROM history_blocks WHERE ts >= 20 "
                                 "ORDER BY rowid").fetchall()
        assert runs == [(20.0, 2), (21.0, 1), (20.0, 2)]
    finally:
        twin.close()
    with TwinView.open(cfg.twin_path) as view:
        assert [r["value"] for r in view.history("d.a", 0.0)] == [10.0, 11.5]


def test_prune_removes_old_blocks_and_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "twin.db"
    old = old_twin(path)
    old_write(old, [(0.0, [Reading(f"r.{i % 4}", float(i), "good", float(i)) for i in range(100)])])  # ts 0..99
    old.close()
    twin = Twin.open(path)
    try:
        twin.write_batch([(float(t), [Reading(f"b.{i}", float(t), "good", float(t)) for i in range(10)])
                          for t in range(50, 150)])  # 100 blocks of 10, ts 50..149
        assert twin.prune(before=120.0, chunk=25) == 100 + 70 * 10
        left = twin.conn.execute("SELECT min(ts), count(*) FROM history").fetchone()
        assert left == (120.0, 30 * 10)
        assert twin.conn.execute("SELECT count(*) FROM history_rows").fetchone()[0] == 0
        assert twin.conn.execute("SELECT count(*) FROM history_blocks").fetchone()[0] == 30
        assert twin.prune(before=120.0) == 0
        # the point ids stay: a name keeps its id, ids are not reused
        assert twin.conn.execute("SELECT count(*) FROM history_points").fetchone()[0] == 10
    finally:
        twin.close()


def test_insert_into_the_view_stores_a_row(tmp_path: Path) -> None:
    twin = Twin.open(tmp_path / "twin.db")
    try:
        twin.write_batch([(5.0, [Reading("x.a", 1.0, "good", 5.0)])])
        with twin.transaction() as conn:
            conn.executemany("INSERT INTO history (point, value, quality, ts) VALUES (?, ?, ?, ?)",
                             [("x.a", 2.5, "bad", 6.0), ("x.a", "text", "good", 4.0), ("x.b", None, "bad", 6.0)])
        assert twin.conn.execute("SELECT point, value, quality, ts FROM history_rows ORDER BY ts").fetchall() == [
            ("x.a", "text", "good", 4.0), ("x.a", 2.5, "bad", 6.0), ("x.b", None, "bad", 6.0)]
        with pytest.raises(sqlite3.IntegrityError):  # the table's constraints hold through the view
            twin.conn.execute("INSERT INTO history (point, value, quality, ts) VALUES ('x.a', 1, 'good', NULL)")
    finally:
        twin.close()
    with TwinView.open(tmp_path / "twin.db") as view:
        assert [(r["ts"], r["value"]) for r in view.history("x.a", 0.0)] == [(4.0, "text"), (5.0, 1.0), (6.0, 2.5)]
        assert view.history_count() == 4


def test_point_ids_survive_a_reopen_and_a_rolled_back_batch(tmp_path: Path) -> None:
    path = tmp_path / "twin.db"
    twin = Twin.open(path)
    twin.write_batch([(1.0, [Reading("a", 1.0, "good", 1.0), Reading("b", 2.0, "good", 1.0)])])
    ids = dict(twin.conn.execute("SELECT name, id FROM history_points"))
    # a batch that fails after "c" got an id: rolled back, the id is forgotten with it
    with pytest.raises(TwinError, match="cannot store readings"):
        bad = Reading("a", b"\x00", "good", 2.5)  # type: ignore[arg-type]  # a value JSON cannot hold
        twin.write_batch([(2.0, [Reading("c", 3.0, "good", 2.0), bad])])  # "c" alone: its block template is made
    assert twin.conn.execute("SELECT count(*) FROM history_points WHERE name = 'c'").fetchone()[0] == 0
    other = Twin.open(path)  # another writer gives "d" an id this one does not know of
    other.write_batch([(3.0, [Reading("d", 4.0, "good", 3.0)])])
    other.close()
    # "c" gets an id again (the one forgotten is "d"'s now): a template kept from the rolled-back batch would be wrong
    twin.write_batch([(4.0, [Reading("d", 5.0, "good", 4.0), Reading("c", 6.0, "good", 4.5)])])
    twin.close()
    twin = Twin.open(path)
    try:
        now = dict(twin.conn.execute("SELECT name, id FROM history_points"))
        assert {k: now[k] for k in ids} == ids and len(set(now.values())) == 4
        twin.write_batch([(5.0, [Reading("a", 7.0, "good", 5.0)])])
        rows = twin.conn.execute("SELECT point, value FROM history ORDER BY ts, point").fetchall()
        assert rows == [("a", 1.0), ("b", 2.0), ("d", 4.0), ("d", 5.0), ("c", 6.0), ("a", 7.0)]
    finally:
        twin.close()


def bits(values: Iterable[float]) -> list[bytes]:
    return [struct.pack(">d", v) for v in values]


def test_float_texts_read_back_bit_for_bit() -> None:
    """The texts (orjson's shortest digits) are JSON numbers that read back to the very same float,
    through Python's json and through SQLite's json_extract, as repr's did."""
    rng = random.Random(13)
    tricky = [0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-05, 1.5e-07, 1e16,
              1e22, 123456789012345680.0, 0.1, 1 / 3, 2.0**53, 2.0**53 + 2, -1e-300]
    words = [rng.getrandbits(32) & 0xFF7FFFFF for _ in range(500)]  # any sign; never the all-ones exponent
    float32 = list(struct.unpack(">500f", struct.pack(">500I", *words)))
    doubles = [rng.uniform(-1e6, 1e6) for _ in range(500)] + [math.ldexp(rng.random(), rng.randint(-1000, 1000))
                                                              for _ in range(500)]
    values = tuple(tricky + float32 + doubles)
    texts = floats.make(values)
    assert texts is not None and len(texts) == len(values)
    assert bits(map(json.loads, texts)) == bits(values)
    assert [floats.one(v) for v in values] == texts
    with sqlite3.connect(":memory:") as conn:
        back = [conn.execute("SELECT json_extract(?, '$[0]')", (f"[{t}]",)).fetchone()[0] for t in texts]
    assert bits(back) == bits(values)


def test_float_texts_are_made_once_for_a_consumer_bounded_and_only_for_finite_floats() -> None:
    floats.clear()
    try:
        run = tuple(i * 0.1 + 1e-9 for i in range(100))
        made = floats.texts(run)
        assert made is not None and bits(map(json.loads, made)) == bits(run)  # JSON numbers, read back exactly
        assert floats.kept() == 0  # no consumer: nothing is kept
        floats.share(True)  # the v2 telemetry runs
        made = floats.texts(run)
        assert floats.kept() == 100 and floats.take(tuple(run)) is made  # taken, not made again
        assert floats.kept() == 0 and floats.take(run) == made  # taken once; then made again
        assert floats.texts((1.0, math.nan)) is None and floats.texts((1.0, -math.inf)) is None
        assert floats.texts((1.0, True)) is None and floats.texts((1, 2.0)) is None and floats.texts(()) is None
        first = tuple(float(i) for i in range(100))
        floats.texts(first)
        for start in range(100, floats.LIMIT_VALUES + 1000, 100):  # a consumer far behind: bounded
            floats.texts(tuple(float(start + i) for i in range(100)))
        waiting = floats.kept()
        assert waiting <= floats.LIMIT_VALUES
        assert floats.take(first) == floats.make(first) and floats.kept() == waiting  # the oldest went first
        floats.share(False)  # the consumer stopped: nothing waits
        assert floats.kept() == 0
    finally:
        floats.clear()


class _Telemetry:
    """A forward that prepares v2 entries the way the cloud sync does (and keeps what it made)."""

    def __init__(self, limit: int = 1000) -> None:
        from edge_agent.cloud.payloads import CompactTelemetryEncoder

        self.encoder = CompactTelemetryEncoder("gw")
        self.entries: list[tuple[str, int]] = []
        self.limit = limit  # mqtt.max_samples: longer runs are split into entries of at most this

    def prepare(self, readings: Sequence[Reading]) -> list[tuple[str, int]]:
        self.entries = self.encoder.entries(readings, self.limit)
        return self.entries

    def add(self, readings: Sequence[Reading], prepared: Any = None) -> None:
        pass


async def test_texts_the_telemetry_does_not_take_are_forgotten_after_each_flush(tmp_path: Path) -> None:
    """A run longer than mqtt.max_samples: one run for the twin, entries of at most max_samples for the
    telemetry, so the twin's texts are never taken; they must not stay in memory until the bound pushes
    them out. (Two devices' reads with the same timestamp did the same before the telemetry made one
    entry per read.)"""
    from edge_agent.store.writer import TwinWriter

    names = [f"a.p{i}" for i in range(50)] + [f"b.p{i}" for i in range(50)]
    cfg = builders.load(builders.config(tmp_path, devices=[
        builders.modbus("a", [builders.point(n, address=2 * i, type="float32") for i, n in enumerate(names[:50])]),
        builders.modbus("b", [builders.point(n, address=2 * i, type="float32") for i, n in enumerate(names[50:])],
                        port=1503)]), tmp_path / "agent.toml")
    twin = Twin.open(cfg.twin_path)
    twin.sync_points(cfg)
    writer = TwinWriter(twin, cfg.twin)
    telemetry = _Telemetry(limit=30)
    writer.forward = telemetry
    floats.clear()
    floats.share(True)
    try:
        for flush in range(3):
            ts = 1000.0 + flush
            writer.submit([Reading(n, i * 0.5 + flush + 0.1, "good", ts) for i, n in enumerate(names)])
            assert await writer.flush() == 100
            assert floats.kept() == 0  # without the forgetting: 100 more values' texts every flush
            assert [count for _, count in telemetry.entries] == [30, 30, 30, 10]
            assert json.loads(telemetry.entries[1][0])["values"][:2] == [flush + 15.1, flush + 15.6]
    finally:
        floats.clear()
        twin.close()


def test_device_reads_with_columns_store_and_send_what_the_same_readings_do(tmp_path: Path) -> None:
    """A Modbus read comes as a DeviceRead (its values also as columns), which the twin and the v2
    telemetry take a shorter way. Two twins get the same readings, one as DeviceReads and one as
    plain lists, with single readings of the same points in between (a device marked bad, a model):
    history, the points table (the newest reading of each point wins, whichever kind) and the
    telemetry entries must come out the same."""
    from edge_agent.cloud.payloads import CompactTelemetryEncoder

    rng = random.Random(7)
    devices = {f"d{d}": tuple(f"d{d}.p{i}" for i in range(6)) for d in range(3)}
    kinds: list[Any] = [lambda: rng.uniform(-50, 50), lambda: rng.randint(-9, 9), lambda: rng.random() < 0.5,
                        lambda: rng.choice((math.nan, 1.5, None, "on"))]
    cfg = builders.load(builders.config(tmp_path, devices=[
        builders.modbus(device, [builders.point(n, address=2 * i, type="float32") for i, n in enumerate(names)],
                        port=1502 + d) for d, (device, names) in enumerate(devices.items())]), tmp_path / "agent.toml")
    twins = [Twin.open(tmp_path / f"{kind}.db") for kind in ("columns", "plain")]
    for twin in twins:
        twin.sync_points(cfg)
    encoder = CompactTelemetryEncoder("gw")
    entries: list[list[tuple[str, int]]] = [[], []]
    ts = 1000.0
    for flush in range(40):
        reads: list[DeviceRead | list[Reading]] = []
        for _ in range(rng.randint(1, 6)):
            ts += rng.choice((0.0, 0.25))
            names = devices[rng.choice(list(devices))]
            if rng.random() < 0.2:  # a single reading of a point some device read also has
                reads.append([Reading(rng.choice(names), rng.uniform(0, 9), rng.choice(("bad", "stale")), ts)])
                continue
            make = rng.choice(kinds)
            reads.append(DeviceRead(names, tuple(make() for _ in names), rng.choice(("good", "uncertain")), ts))
        chunks = [[(ts + 0.01, read) for read in reads], [(ts + 0.01, list(read)) for read in reads]]
        update = flush % 3 == 2
        for index, twin in enumerate(twins):
            kept = twin.write_batch(chunks[index], update_points=update)
            assert list(kept) == [r for read in reads for r in read]
            entries[index] += encoder.entries(kept, 1000)
    assert entries[0] == entries[1] and len(entries[0]) > 60
    queries = ("SELECT point, value, quality, ts FROM history ORDER BY ts, point",
               "SELECT name, value, quality, source_ts, received_ts FROM points ORDER BY name",
               "SELECT ts, samples FROM history_blocks ORDER BY rowid")
    for query in queries:
        rows = [twin.conn.execute(query).fetchall() for twin in twins]
        assert same(rows[0], rows[1]) and rows[0], query
    for twin in twins:
        twin.close()
