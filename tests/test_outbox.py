"""The durable outbox on real SQLite files: seqs, acks, restarts, limits and gaps, disk use, kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import TwinError
from edge_agent.pacing import TokenBucket
from edge_agent.store.messages import Draft, Gap, OutboxLimits, Stamp
from edge_agent.store.outbox import Outbox
from edge_agent.store.sqlite import file_bytes
from edge_agent.store.views import read_stats
from tests.helpers import wait_for_sync

TOPIC = "edge/site/gw/telemetry"


def build(stamp: Stamp) -> bytes:
    """A payload that embeds the seq and the gap record, as the sync step's will."""
    body: dict[str, Any] = {"seq": stamp.seq}
    if stamp.gap is not None:
        body.update(stamp.gap.record())
    return json.dumps(body).encode()


def telemetry(samples: int = 10) -> Draft:
    return Draft("telemetry", TOPIC, build, samples=samples)


def event() -> Draft:
    return Draft("event", "edge/site/gw/events", build)


def drain(outbox: Outbox) -> list[Any]:
    """Take and ack everything, returning (kind, decoded payload) in delivery order."""
    out = []
    while batch := outbox.take(1000):
        out += [(m.kind, json.loads(m.payload)) for m in batch]
        outbox.ack(m.id for m in batch)
    return out


def seqs(delivered: list[Any], kind: str = "telemetry") -> list[int]:
    return [body["seq"] for k, body in delivered if k == kind]


def test_seq_contiguous_per_kind_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox.open(path) as outbox:
        appended = outbox.append([telemetry(), event(), telemetry(), telemetry()])
        assert [a.seq for a in appended] == [1, 1, 2, 3]
        assert outbox.append_telemetry(TOPIC, build, 5).seq == 4
    with Outbox.open(path) as outbox:
        outbox.append([event(), telemetry()])
        delivered = drain(outbox)
        stats = outbox.stats()
    assert seqs(delivered) == [1, 2, 3, 4, 5]
    assert seqs(delivered, "event") == [1, 2]
    assert [k for k, _ in delivered] == ["telemetry", "event", "telemetry", "telemetry", "telemetry",
                                         "event", "telemetry"]
    assert (stats.next_telemetry_seq, stats.next_event_seq, stats.depth) == (6, 3, 0)


def test_file_settings(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "outbox.db", synchronous="full") as outbox:
        pragmas = [outbox.conn.execute(f"PRAGMA {name}").fetchone()[0]
                   for name in ("journal_mode", "synchronous", "auto_vacuum", "user_version")]
    assert pragmas == ["wal", 2, 2, 3]  # WAL, FULL, INCREMENTAL, schema 3
    with Outbox.open(tmp_path / "outbox.db") as outbox:
        assert outbox.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_failing_builder_stores_nothing_and_uses_no_seq(tmp_path: Path) -> None:
    def broken(stamp: Stamp) -> bytes:
        raise RuntimeError("serialiser bug")

    with Outbox.open(tmp_path / "outbox.db") as outbox:
        outbox.append([telemetry()])
        with pytest.raises(RuntimeError):
            outbox.append([telemetry(), Draft("telemetry", TOPIC, broken)])
        assert outbox.stats().depth == 1
        assert outbox.append([telemetry()])[0].seq == 2


def test_take_respects_max_inflight_and_ack_deletes(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "outbox.db", max_inflight=3) as outbox:
        outbox.append([telemetry(samples=i) for i in range(5)])
        first = outbox.take(10)
        assert [m.seq for m in first] == [1, 2, 3]
        assert outbox.take(10) == []
        assert outbox.ack([first[0].id, first[1].id, 12345]) == 2
        assert outbox.ack([first[0].id]) == 0  # a repeated PUBACK changes nothing
        assert [m.seq for m in outbox.take(10)] == [4, 5]
        stats = outbox.stats()
        assert (stats.depth, stats.inflight) == (3, 3)
        assert stats.bytes == sum(len(build(Stamp(s))) for s in (3, 4, 5))
        assert outbox.conn.execute("SELECT seq FROM messages ORDER BY id").fetchall() == [(3,), (4,), (5,)]


def test_unacked_messages_come_back_after_reopen_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox.open(path, max_inflight=4) as outbox:
        outbox.append([telemetry(), event(), telemetry(), telemetry(), telemetry(), telemetry()])
        taken = outbox.take(4)
        outbox.ack([taken[1].id, taken[3].id])  # PUBACKs may arrive out of order; 1 and 3 are lost
    with Outbox.open(path) as outbox:
        again = [(m.kind, m.seq, json.loads(m.payload)["seq"]) for m in outbox.take(100)]
    assert again == [("telemetry", 1, 1), ("telemetry", 2, 2), ("telemetry", 4, 4), ("telemetry", 5, 5)]


def test_requeue_hands_out_in_flight_messages_again(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "outbox.db", max_inflight=2) as outbox:
        outbox.append([telemetry() for _ in range(3)])
        assert [m.seq for m in outbox.take(5)] == [1, 2]
        outbox.requeue()
        assert outbox.inflight == 0
        assert [m.seq for m in outbox.take(5)] == [1, 2]


def test_limit_drops_oldest_telemetry_keeps_events_and_reports_the_gap_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox.open(path, limits=OutboxLimits(max_rows=4, event_share=0.5)) as outbox:
        outbox.append([event(), telemetry(samples=10), telemetry(samples=20), event()])
        outbox.append([telemetry(samples=30)])  # drops seq 1
        outbox.append([telemetry(samples=40)])  # carries gap 1..1, drops seq 2
        assert outbox.stats().pending_gap == Gap(2, 2, 1, 20)
    with Outbox.open(path, limits=OutboxLimits(max_rows=4, event_share=0.5)) as outbox:  # the gap survives
        outbox.append([telemetry(samples=50)])  # carries gap 2..2, drops seq 3
        delivered = drain(outbox)
        stats = outbox.stats()
    assert seqs(delivered, "event") == [1, 2]
    assert seqs(delivered) == [4, 5]
    assert [body.get("gap") for _, body in delivered if body["seq"] in (4, 5)] == [
        {"from_seq": 1, "to_seq": 1, "messages": 1, "samples": 10},
        {"from_seq": 2, "to_seq": 2, "messages": 1, "samples": 20}]
    assert (stats.dropped_messages, stats.dropped_samples) == (3, 60)
    assert stats.pending_gap == Gap(3, 3, 1, 30)
    # the gap is handed out exactly once: the next telemetry carries 3..3, the one after nothing
    with Outbox.open(path) as outbox:
        outbox.append([telemetry(), telemetry()])
        bodies = [body for _, body in drain(outbox)]
    assert bodies == [{"seq": 6, "gap": {"from_seq": 3, "to_seq": 3, "messages": 1, "samples": 30}}, {"seq": 7}]


def test_byte_limit_drops_as_many_old_messages_as_needed(tmp_path: Path) -> None:
    big = Draft("telemetry", TOPIC, b"x" * 400, samples=100)
    with Outbox.open(tmp_path / "outbox.db", limits=OutboxLimits(max_bytes=1000)) as outbox:
        outbox.append([big, big])
        outbox.append([Draft("telemetry", TOPIC, build(Stamp(None)) + b" " * 800, samples=7)])
        stats = outbox.stats()
    assert stats.bytes <= 1000
    assert (stats.depth, stats.dropped_messages, stats.dropped_samples) == (1, 2, 200)
    assert stats.pending_gap == Gap(1, 2, 2, 200)


def response() -> Draft:
    return Draft("response", "edge/site/gw/cmd/response", b'{"v":1}')


def test_events_keep_to_their_share_and_report_what_they_dropped(tmp_path: Path) -> None:
    """Before (issue 11): events and responses were never dropped, so a flood of them filled the outbox
    and every telemetry message after that was refused."""
    path = tmp_path / "outbox.db"
    limits = OutboxLimits(max_rows=10, event_share=0.3, event_min_rows=0)  # 3 rows for events and responses
    with Outbox.open(path, limits=limits) as outbox:
        # e1 r1 e2 | e3 drops e1 | r2 drops r1 | e4 carries 1..1, drops e2
        outbox.append([event(), response(), event(), event(), response(), event()])
        assert outbox.stats().pending_event_gap == Gap(2, 2, 1, 0)
        appended = outbox.append([telemetry(samples=1) for _ in range(20)])
        assert all(a.id is not None for a in appended), "telemetry refused while events filled the outbox"
        stats = outbox.stats()
        assert (stats.dropped_events, stats.dropped_responses, stats.depth) == (2, 1, 10)
        assert (stats.dropped_messages, stats.dropped_samples) == (13, 13)  # the oldest telemetry, as before
        outbox.append([event()])  # e5 carries 2..2, drops e3
        delivered = drain(outbox)
        stats = outbox.stats()
    events = [body for kind, body in delivered if kind == "event"]
    assert events == [{"seq": 4, "gap": {"from_seq": 1, "to_seq": 1, "messages": 1, "samples": 0}},
                      {"seq": 5, "gap": {"from_seq": 2, "to_seq": 2, "messages": 1, "samples": 0}}]
    assert stats.pending_event_gap == Gap(3, 3, 1, 0) and stats.dropped_events == 3
    on_disk = read_stats(path)  # what `edge-agent twin outbox` and a restart see
    assert (on_disk.dropped_events, on_disk.dropped_responses, on_disk.pending_event_gap) == (3, 1, Gap(3, 3, 1, 0))


def test_telemetry_takes_room_from_events_and_is_refused_only_for_messages_in_flight(tmp_path: Path) -> None:
    limits = OutboxLimits(max_rows=3, event_share=1.0, event_min_rows=0)
    with Outbox.open(tmp_path / "outbox.db", limits=limits) as outbox:
        outbox.append([event(), event(), event()])
        assert outbox.append([telemetry(samples=7)])[0].id is not None  # the oldest event makes room
        assert outbox.stats().pending_event_gap == Gap(1, 1, 1, 0)
        outbox.take(3)  # everything in flight: nothing may be dropped
        refused = outbox.append([telemetry(samples=8), event()])
        assert [(a.id is None, a.seq) for a in refused] == [(True, 2), (False, 4)]  # an event still goes in
        stats = outbox.stats()
        assert (stats.depth, stats.dropped_messages, stats.dropped_samples) == (4, 1, 8)


def test_a_dropped_gap_record_is_reported_again(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "outbox.db", limits=OutboxLimits(max_rows=2)) as outbox:
        outbox.append([telemetry(1), telemetry(2), telemetry(3)])  # 3 drops 1
        outbox.append([telemetry(4)])  # 4 carries gap 1..1, drops 2
        outbox.append([telemetry(5), telemetry(6)])  # 5 carries 2..2 and drops 3; 6 carries 3..3, drops 4
        delivered = drain(outbox)
        pending = outbox.stats().pending_gap
    assert delivered == [("telemetry", {"seq": 5, "gap": {"from_seq": 2, "to_seq": 2, "messages": 1, "samples": 2}}),
                         ("telemetry", {"seq": 6, "gap": {"from_seq": 3, "to_seq": 3, "messages": 1, "samples": 3}})]
    # 4 is dropped and so is the record of 1 it carried: both go into the next gap
    assert pending == Gap(1, 4, 2, 1 + 4)


def test_in_flight_messages_are_not_dropped(tmp_path: Path) -> None:
    with Outbox.open(tmp_path / "outbox.db", limits=OutboxLimits(max_rows=2)) as outbox:
        outbox.append([telemetry(), telemetry()])
        in_flight = outbox.take(1)
        outbox.append([telemetry()])  # must drop seq 2, not the in-flight seq 1
        outbox.ack(m.id for m in in_flight)
        assert seqs(drain(outbox)) == [3]
        assert outbox.stats().pending_gap == Gap(2, 2, 1, 10)


def test_newer_snapshot_replaces_pending_one_of_same_topic(tmp_path: Path) -> None:
    def twin(value: int, topic: str = "edge/site/gw/twin") -> Draft:
        return Draft("twin", topic, json.dumps({"v": value}).encode(), retain=True)

    with Outbox.open(tmp_path / "outbox.db") as outbox:
        outbox.append([twin(1), telemetry(), twin(2, "other/twin")])
        sent = outbox.take(1)  # twin 1 in flight: a newer one must not pull it back
        outbox.append([twin(3), twin(4)])
        rest = outbox.take(10)
        assert [(m.kind, m.payload) for m in sent + rest] == [
            ("twin", b'{"v": 1}'), ("telemetry", b'{"seq": 1}'), ("twin", b'{"v": 2}'), ("twin", b'{"v": 4}')]
        assert rest[-1].retain and rest[-1].seq is None
        assert outbox.stats().dropped_messages == 0


def test_file_stays_small_over_many_append_ack_cycles(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    payload = os.urandom(64 * 1024)
    with Outbox.open(path, max_inflight=100) as outbox:
        for _ in range(800):  # 200 MiB through the outbox, 256 KiB at a time
            outbox.append([Draft("telemetry", TOPIC, payload, samples=500)] * 4)
            outbox.ack(m.id for m in outbox.take(100))
            assert file_bytes(path) < 16 * 1024 * 1024
        # a 32 MiB backlog, drained: the file gives the space back
        for _ in range(128):
            outbox.append([Draft("telemetry", TOPIC, payload, samples=500)] * 4)
        assert file_bytes(path) > 32 * 1024 * 1024
        drain_ids = []
        while batch := outbox.take(100):
            drain_ids += [m.id for m in batch]
            outbox.ack(m.id for m in batch)
        assert len(drain_ids) == 512
        outbox.maintain()
        assert file_bytes(path) < 4 * 1024 * 1024
    assert file_bytes(path) < 4 * 1024 * 1024


def test_sqlite_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"not a database, just some bytes" * 100)
    with pytest.raises(TwinError, match=re.escape(str(path))) as info:
        Outbox.open(path)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    with pytest.raises(TwinError, match="no outbox yet"):
        read_stats(tmp_path / "missing.db")


def test_read_stats_while_the_writer_is_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    clock = [1000.0]
    with Outbox.open(path, limits=OutboxLimits(max_rows=2), clock=lambda: clock[0]) as outbox:
        outbox.append([telemetry(samples=5), telemetry(), telemetry()])
        clock[0] = 1012.5
        stats = read_stats(path, clock=lambda: clock[0])
        assert stats == outbox.stats()
    assert (stats.depth, stats.oldest_age_s, stats.dropped_samples, stats.next_telemetry_seq) == (2, 12.5, 5, 4)
    assert stats.pending_gap == Gap(1, 1, 1, 5)


# ---------------------------------------------------------------------------- kill -9

CHILD = r"""
import json, os, sys
from pathlib import Path
from edge_agent.store.messages import Draft, OutboxLimits
from edge_agent.store.outbox import Outbox

def build(stamp):
    body = {"seq": stamp.seq, "pad": "x" * (stamp.seq % 50 if stamp.seq else 0)}
    if stamp.gap is not None:
        body.update(stamp.gap.record())
    return json.dumps(body).encode()

log = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
with Outbox.open(Path(sys.argv[1]), limits=OutboxLimits(max_rows=40), max_inflight=5) as outbox:
    i = 0
    while True:  # produce faster than the "link" delivers, so the limit drops telemetry
        i += 1
        drafts = [Draft("telemetry", "t", build, samples=1 + (i + k) % 7) for k in range(3)]
        if i % 4 == 0:
            drafts.append(Draft("event", "e", build))
        outbox.append(drafts)
        if i % 2:
            taken = outbox.take(5)
            for m in taken:  # "delivered": written to the receiver's log before the PUBACK
                os.write(log, json.dumps([m.kind, m.payload.decode()]).encode() + b"\n")
            outbox.ack(m.id for m in taken[:-1])  # the last PUBACK is lost ...
            if i % 6 == 1:
                outbox.requeue()  # ... and the link reconnects, so it is sent again
"""


def received_lines(log: Path) -> list[Any]:
    lines = log.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1]]  # a torn last line was never "received"


def test_kill_9_while_appending_loses_nothing_unreported(tmp_path: Path) -> None:
    path, log = tmp_path / "outbox.db", tmp_path / "received.jsonl"
    log.touch()
    for round_ in range(1, 4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(log)])
        try:
            wait_for_sync(lambda n=round_: len(received_lines(log)) >= 500 * n, timeout=30,
                          what="the child to deliver messages")
        finally:
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()

    received = [(kind, json.loads(payload)) for kind, payload in received_lines(log)]
    with Outbox.open(path, max_inflight=10_000) as outbox:
        received += [(m.kind, json.loads(m.payload)) for m in outbox.take(10_000)]
        stats = outbox.stats()

    by_seq: dict[tuple[str, int], Any] = {}
    for kind, body in received:  # a repeat is a repeat: same seq, same payload
        assert by_seq.setdefault((kind, body["seq"]), body) == body
    events = sorted(seq for kind, seq in by_seq if kind == "event")
    assert events == list(range(1, stats.next_event_seq))  # events are never dropped

    gaps = [Gap(**body["gap"]) for kind, body in by_seq.items() if "gap" in body]
    if stats.pending_gap is not None:
        gaps.append(stats.pending_gap)
    missing = {seq for seq in range(1, stats.next_telemetry_seq) if ("telemetry", seq) not in by_seq}
    assert stats.dropped_messages > 0 and missing
    for seq in missing:  # every missing seq is inside a reported (or still pending) gap
        assert any(g.from_seq <= seq <= g.to_seq for g in gaps), seq
    assert sum(g.messages for g in gaps) >= len(missing)
    assert stats.dropped_messages >= len(missing)


# ---------------------------------------------------------------------------- token bucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_burst_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.try_take() for _ in range(6)] == [True] * 5 + [False]
    assert bucket.wait_time() == pytest.approx(0.1)
    clock.now += 0.25
    assert bucket.try_take(2) and not bucket.try_take()
    clock.now += 60  # idle time saves up no more than the burst
    assert bucket.tokens == 5


def test_token_bucket_lets_a_take_larger_than_burst_through_on_a_full_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1000, burst=500, clock=clock)  # samples/s, messages of 2000 samples
    assert bucket.try_take(2000)
    assert bucket.tokens == -1500
    assert bucket.wait_time(2000) == pytest.approx(2.0)  # in debt: the average rate holds
    clock.now += 1.5
    assert not bucket.try_take(2000)
    clock.now += 0.5
    assert bucket.try_take(2000)


def test_token_bucket_ignores_a_clock_going_backwards_and_rejects_bad_settings() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.try_take()
    clock.now -= 10
    assert bucket.tokens == 0
    clock.now += 11
    assert bucket.tokens == pytest.approx(1)
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1)
