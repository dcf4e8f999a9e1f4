"""Cloud sync against a real mosquitto with mutual TLS: online, outage, kill -9, limits, bad TLS.

Every test records what a subscriber received and checks it against the twin's history and the
outbox's own counters. When a test restarts the broker, it waits for the recorder to resubscribe
before the agent can reconnect (an in-process agent shares the test's event loop, so blocking it
for that moment holds the agent back; a subprocess agent is started only then): the broker keeps
no session across the restart, so a message published before the resubscription would miss the
recorder, and a missing message must be the agent's fault, never the test's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.store.views import TwinView, read_stats
from tests import builders
from tests.fakes import FakePlant
from tests.helpers import free_port, wait_for, wait_for_sync
from tests.mqtt_broker import AGENT_CN, Broker, Message, Pki, Recorder
from tests.schemas import load_schema, validate

PREFIX = "edge/plant-a/gw-01"
TELEMETRY, STATE, TWIN, EVENTS = (f"{PREFIX}/{t}" for t in ("telemetry", "state", "twin", "events"))
OUTAGE = 20.0  # seconds the broker is away in the outage test (the issue asks for 20 s)

Sample = tuple[str, float, Any, str]


def counting() -> FakePlant:
    """A device whose points count up by one every read: every sample is distinct and checkable."""
    return FakePlant(counting=True, accepts_writes=False)


def agent_config(tmp_path: Path, broker: Broker, pki: Pki, *, points: int = 3, mqtt: builders.Doc | None = None,
                 cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> config.AgentConfig:
    """The config for an in-process agent, also written to ``tmp_path/agent.toml`` for the CLI.

    ``mqtt`` adds or overrides keys of the [mqtt] section; ``ca``, ``cert`` and ``key`` replace the agent's TLS files.
    """
    section = builders.mqtt(pki, broker.port, ca=ca, cert=cert, key=key, publish_interval="100ms",
                            twin_interval="200ms", retry_min="100ms", retry_max="500ms")
    dev = builders.modbus("dev", builders.numbered("dev.p", points), interval="100ms")
    doc = builders.config(tmp_path / "data", id=AGENT_CN, site="plant-a", twin={"flush_interval": "50ms"},
                          mqtt={**section, **(mqtt or {})}, devices=[dev])
    return builders.load(doc, tmp_path / "agent.toml")


def telemetry(recorder: Recorder) -> list[dict[str, Any]]:
    return [m.json() for m in recorder.messages(TELEMETRY)]


def by_seq(messages: Iterable[Message]) -> dict[int, dict[str, Any]]:
    """Messages by seq. A seq received twice must carry the byte-identical payload (a redelivery)."""
    first: dict[int, bytes] = {}
    for m in messages:
        seq = m.json()["seq"]
        assert first.setdefault(seq, m.payload) == m.payload, f"seq {seq} repeated with a different payload"
    return {seq: json.loads(payload) for seq, payload in first.items()}


def seqs(messages: Iterable[Message]) -> set[int]:
    return {m.json()["seq"] for m in messages}


def samples(received: dict[int, dict[str, Any]]) -> list[Sample]:
    """Every sample received, in seq order."""
    return [(p["name"], p["ts"], p["value"], p["quality"]) for seq in sorted(received)
            for p in received[seq]["points"]]


def history(data_dir: Path) -> list[Sample]:
    """The twin's history rows in the order they were stored (read-only, the agent may be running)."""
    conn = sqlite3.connect(f"file:{data_dir / 'twin.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT point, ts, value, quality FROM history_rows ORDER BY rowid").fetchall()
        rows += conn.execute(  # the blocks in the order they were stored, each block's samples in order
            "SELECT p.name, b.ts, json_extract(s.value, '$[1]'), json_extract(s.value, '$[2]') "
            "FROM history_blocks AS b JOIN json_each(b.samples) AS s "
            "JOIN history_points AS p ON p.id = json_extract(s.value, '$[0]') ORDER BY b.rowid, s.key").fetchall()
        return [tuple(r) for r in rows]
    finally:
        conn.close()


def outbox_rows(data_dir: Path) -> tuple[list[tuple[str, int | None]], int, int]:
    """(kind, seq) of every stored message, next telemetry seq and dropped messages, in one snapshot."""
    conn = sqlite3.connect(f"file:{data_dir / 'outbox.db'}?mode=ro", uri=True)
    try:
        conn.execute("BEGIN")
        rows = conn.execute("SELECT kind, seq FROM messages ORDER BY id").fetchall()
        next_seq, dropped = conn.execute("SELECT next_telemetry_seq, dropped_messages FROM meta").fetchone()
        conn.execute("COMMIT")
        return rows, next_seq, dropped
    finally:
        conn.close()


def running_task_names() -> set[str]:
    return {t.get_name() for t in asyncio.all_tasks() if not t.done()}


# -------------------------------------------------------------------------------------- online


async def test_online_telemetry_seq_contiguous_values_equal_twin(tmp_path: Path, broker: Broker, pki: Pki) -> None:
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = Agent(agent_config(tmp_path, broker, pki), driver_factory=counting().driver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda msgs: len([m for m in msgs if m.topic.endswith("/telemetry")]) >= 5,
                                          timeout=20)
            state = [m for m in recorder.messages(STATE)]
            assert state and state[0].json()["state"] == "online" and state[0].json()["gateway"] == AGENT_CN
            twin_msgs = recorder.messages(TWIN)
            assert twin_msgs and {p["name"] for p in twin_msgs[-1].json()["points"]} == {"dev.p0", "dev.p1", "dev.p2"}
        finally:
            await agent.stop()
        stored = history(tmp_path / "data")
        # the broker acknowledged everything before stop() returned, but may still be forwarding it
        await recorder.wait_for_async(lambda _: sum(len(m["points"]) for m in telemetry(recorder)) >= len(stored),
                                      timeout=10, topic=TELEMETRY)
        msgs = telemetry(recorder)
        seq_list = [m["seq"] for m in msgs]
        assert seq_list == list(range(seq_list[0], seq_list[0] + len(seq_list)))
        assert all(m["v"] == 1 and m["gateway"] == AGENT_CN for m in msgs)
        sent = [(p["name"], p["ts"], p["value"], p["quality"]) for m in msgs for p in m["points"]]
        assert sent == stored  # every sample the twin kept went out, in order, equal values
        await recorder.wait_for_async(
            lambda ms: ms and json.loads(ms[-1].payload)["state"] == "offline", timeout=10, topic=STATE)


# -------------------------------------------------------------------------------------- outage


def split_live_from_backlog(arrivals: list[int], lowest: int) -> int | None:
    """The smallest threshold T >= lowest such that the seqs <= T (backlog) and the seqs > T (live)
    each arrived in increasing order; None when the arrivals are not two such interleaved runs."""
    for threshold in range(lowest, max(arrivals, default=lowest) + 1):
        low = [s for s in arrivals if s <= threshold]
        high = [s for s in arrivals if s > threshold]
        if low == sorted(low) and high == sorted(high):
            return threshold
    return None


async def test_broker_down_20s_every_sample_arrives_in_order(tmp_path: Path, pki: Pki) -> None:
    with Broker(pki, tmp_path / "mosquitto") as broker, \
            Recorder(broker, f"{PREFIX}/#") as recorder:
        # A paced replay (200 samples/s, 3 samples a message) so live messages interleave with it, and a
        # small in-flight window so live messages often take the last slot while the backlog waits.
        paced = {"replay_rate": 200, "max_samples": 30, "max_inflight": 2}
        agent = Agent(agent_config(tmp_path, broker, pki, mqtt=paced), driver_factory=counting().driver)
        await agent.start()
        assert agent.outbox is not None and agent.sync is not None
        outbox, link = agent.outbox, agent.sync.link
        try:
            await recorder.wait_for_async(lambda ms: len(ms) >= 3, timeout=20, topic=TELEMETRY)
            broker.stop()
            await wait_for(lambda: not link.connected.is_set(), timeout=10, what="the agent noticing the outage")
            down_at, first_offline_seq, stored_before = time.time(), outbox.stats().next_telemetry_seq, agent.stored
            depths = [outbox.stats().depth]
            outage_ends = time.monotonic() + OUTAGE
            while time.monotonic() < outage_ends:  # the outage itself; the depth is sampled once a second
                await asyncio.sleep(1.0)
                depths.append(outbox.stats().depth)
            stored_offline = agent.stored - stored_before
            up_seq, up_at = outbox.stats().next_telemetry_seq, time.time()
            assert "connection refused" in link.last_error and link.connects == 1
            broker.start()
            recorder.wait_until_subscribed(2)  # blocks the loop, so the agent reconnects only after this
            restarted = time.monotonic()
            await wait_for(lambda: link.connects == 2, timeout=15, what="the agent reconnecting")
            await recorder.wait_for_async(lambda ms: set(range(1, up_seq)) <= seqs(ms), timeout=30, topic=TELEMETRY)
        finally:
            await agent.stop()
        final = read_stats(tmp_path / "data" / "outbox.db")
        await recorder.wait_for_async(lambda ms: max(seqs(ms)) == final.next_telemetry_seq - 1, topic=TELEMETRY)

    # The agent kept running and buffering: the twin grew and so did the outbox, every second.
    assert stored_offline >= 0.5 * OUTAGE * 10 * 3, stored_offline  # 3 points read every 100 ms
    assert depths == sorted(depths) and depths[-1] - depths[0] >= 0.5 * OUTAGE * 10, depths
    assert final.depth == 0 and final.dropped_messages == 0
    # Every seq arrived (repeats only as identical payloads), and every sample equals the twin's.
    received = by_seq(recorder.messages(TELEMETRY))
    assert sorted(received) == list(range(1, final.next_telemetry_seq))
    sent = samples(received)
    assert sent == history(tmp_path / "data")
    assert sum(1 for s in sent if down_at <= s[1] <= up_at) >= 0.5 * OUTAGE * 10 * 3
    # After the restart: the backlog in seq order, live messages ahead of it and in order too.
    before = seqs(m for m in recorder.messages(TELEMETRY) if m.received_at < restarted)
    arrivals: list[int] = []
    for m in recorder.messages(TELEMETRY):
        seq = m.json()["seq"]
        if m.received_at >= restarted and seq not in before and seq not in arrivals:
            arrivals.append(seq)
    assert set(range(first_offline_seq, up_seq)) <= set(arrivals)
    threshold = split_live_from_backlog(arrivals, up_seq - 1)
    assert threshold is not None, arrivals
    last_backlog = max(i for i, s in enumerate(arrivals) if s <= threshold)
    assert any(s > threshold for s in arrivals[:last_backlog]), "live data did not flow during the replay"


# ------------------------------------------------------------------------------- kill -9, restart


def pump_config(tmp_path: Path, broker: Broker, pki: Pki, modbus_port: int) -> Path:
    points = [builders.point(f"pump1.{name}", register="holding", address=address, type=kind)
              for name, address, kind in (("flow", 0, "float32"), ("pressure", 2, "float32"), ("speed", 4, "uint16"),
                                          ("power", 6, "float32"), ("speed_setpoint", 20, "uint16"))]
    section = builders.mqtt(pki, broker.port, publish_interval="200ms", twin_interval="500ms", retry_min="100ms",
                            retry_max="500ms", max_samples=20, replay_rate=100)
    doc = builders.config(tmp_path / "data", id=AGENT_CN, site="plant-a", twin={"flush_interval": "50ms"},
                          mqtt=section, devices=[builders.modbus("pump1", points, port=modbus_port, interval="100ms")])
    return builders.write(doc, tmp_path / "agent.toml")


def start_agent(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config_file)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)


def kill9(process: subprocess.Popen[bytes]) -> float:
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    return time.time()


def match_runs(sent: list[Sample], rows: list[Sample], cuts: list[tuple[int, float]]) -> list[list[Sample]]:
    """Split the twin's rows at each SIGKILL (row count, time) and match ``sent`` against them.

    Within a run, the samples sent must be a prefix of the rows that run stored; the rest (those
    still gathered in memory, without a seq, when the agent was killed) are returned per run.
    After the last run (stopped cleanly) nothing may be missing.
    """
    bounds = [0, *(count for count, _ in cuts), len(rows)]
    lost: list[list[Sample]] = []
    position = 0
    for start, end in itertools.pairwise(bounds):
        run = rows[start:end]
        matched = 0
        while matched < len(run) and position + matched < len(sent) and sent[position + matched] == run[matched]:
            matched += 1
        position += matched
        lost.append(run[matched:])
    assert position == len(sent), f"{len(sent) - position} samples sent that the twin does not have in that order"
    return lost


def test_sigkill_with_backlog_then_restart_loses_nothing(tmp_path: Path, pki: Pki) -> None:
    modbus = free_port()
    plant = subprocess.Popen([sys.executable, "-m", "edge_agent.demo.plant", "--opcua-port", str(free_port()),
                              "--modbus-port", str(modbus)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agents: list[subprocess.Popen[bytes]] = []
    data, log = tmp_path / "data", tmp_path / "agent.log"
    try:
        with Broker(pki, tmp_path / "mosquitto") as broker, \
                Recorder(broker, f"{PREFIX}/#") as recorder:
            config_file = pump_config(tmp_path, broker, pki, modbus)
            agents.append(start_agent(config_file, log))
            recorder.wait_for(lambda ms: len(ms) >= 3, timeout=30, topic=TELEMETRY)
            broker.stop()
            wait_for_sync(lambda: read_stats(data / "outbox.db").depth >= 15, timeout=20, what="a backlog")
            killed_1 = kill9(agents[0])
            rows_1, backlog = len(history(data)), read_stats(data / "outbox.db")
            assert backlog.depth >= 15

            broker.start()
            recorder.wait_until_subscribed(2)
            restarted = time.monotonic()
            agents.append(start_agent(config_file, log))  # killed again while it replays the backlog
            recorder.wait_for(lambda ms: any(m.received_at > restarted for m in ms), timeout=30, topic=TELEMETRY)
            killed_2 = kill9(agents[1])
            rows_2 = len(history(data))

            agents.append(start_agent(config_file, log))
            target = read_stats(data / "outbox.db").next_telemetry_seq
            recorder.wait_for(lambda ms: set(range(1, target)) <= seqs(ms), timeout=40, topic=TELEMETRY)
            agents[2].send_signal(signal.SIGTERM)
            assert agents[2].wait(15) == 0, log.read_text()
            final = read_stats(data / "outbox.db")
            recorder.wait_for(lambda ms: max(seqs(ms)) == final.next_telemetry_seq - 1, topic=TELEMETRY)
    finally:
        for process in agents:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        plant.send_signal(signal.SIGINT)
        try:
            plant.wait(timeout=10)
        except subprocess.TimeoutExpired:
            plant.kill()

    assert final.depth == 0 and final.dropped_messages == 0, final
    received = by_seq(recorder.messages(TELEMETRY))  # repeats are byte-identical redeliveries
    assert sorted(received) == list(range(1, final.next_telemetry_seq)), "a telemetry seq is missing"
    assert backlog.dropped_messages == 0
    rows = history(data)
    lost = match_runs(samples(received), rows, [(rows_1, killed_1), (rows_2, killed_2)])
    # Only what was gathered in memory (no seq yet) in the last moments before each SIGKILL is lost.
    for run_lost, killed in zip(lost, (killed_1, killed_2), strict=False):
        assert all(killed - 3.0 <= s[1] <= killed for s in run_lost), (run_lost, killed)
    assert lost[-1] == [], "a clean stop must deliver everything"
    assert len(rows) - sum(map(len, lost)) >= 100


# ----------------------------------------------------------------------------------- outbox full


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=60)


async def test_outbox_full_drops_oldest_telemetry_keeps_events_reports_gap(tmp_path: Path, pki: Pki,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    with Broker(pki, tmp_path / "mosquitto") as broker, \
            Recorder(broker, f"{PREFIX}/#") as recorder:
        cfg = agent_config(tmp_path, broker, pki, mqtt={"outbox_max_rows": 10})
        broker.stop()
        agent = Agent(cfg, driver_factory=counting().driver)
        await agent.start()
        assert agent.outbox is not None and agent.sync is not None
        outbox, sync = agent.outbox, agent.sync
        try:
            for n, dropped in enumerate((3, 10, 20)):
                await sync.append([sync.event("test", {"n": n})])
                await wait_for(lambda d=dropped: outbox.stats().dropped_messages >= d, timeout=15,
                               what=f"{dropped} telemetry messages dropped")
            rows, next_seq, dropped_offline = outbox_rows(data)
            report = await asyncio.to_thread(_cli, "twin", "outbox", "--config", str(cfg.source), "--json")
            broker.start()
            recorder.wait_until_subscribed(2)  # blocks the loop, so the agent reconnects only after this
            await recorder.wait_for_async(lambda ms: len(ms) == 3, timeout=20, topic=EVENTS)
            await recorder.wait_for_async(lambda ms: max(seqs(ms), default=0) >= next_seq, timeout=20, topic=TELEMETRY)
        finally:
            await agent.stop()
        final = read_stats(data / "outbox.db")
        await recorder.wait_for_async(lambda ms: max(seqs(ms)) == final.next_telemetry_seq - 1, topic=TELEMETRY)

    # Offline, at the limit: the three events and one twin snapshot kept, the newest telemetry kept.
    kept = [seq for kind, seq in rows if kind == "telemetry"]
    assert len(rows) == 10 and [seq for kind, seq in rows if kind == "event"] == [1, 2, 3]
    assert [kind for kind, _ in rows].count("twin") == 1
    assert kept == list(range(next_seq - len(kept), next_seq)) and len(kept) == 6
    assert dropped_offline == next_seq - 1 - len(kept)  # everything older than those was dropped
    # The drop is reported: log, `twin outbox`, and gap records.
    assert any(r.levelname == "WARNING" and "dropping the oldest telemetry" in r.getMessage() for r in caplog.records)
    assert report.returncode == 0, report.stderr
    shown = json.loads(report.stdout)
    assert shown["dropped_messages"] >= dropped_offline > 0 and shown["dropped_samples"] >= shown["dropped_messages"]
    assert shown["depth"] == 10 and shown["next_telemetry_seq"] >= next_seq
    # Events all arrived, in order.
    events = [m.json() for m in recorder.messages(EVENTS)]
    assert [(e["seq"], e["type"], e["n"]) for e in events] == [(1, "test", 0), (2, "test", 1), (3, "test", 2)]
    assert all(validate(e, load_schema("events")) == [] for e in events)
    # Telemetry: what is missing is what was dropped, and the gap records account for all of it.
    received = by_seq(recorder.messages(TELEMETRY))
    missing = set(range(1, final.next_telemetry_seq)) - set(received)
    assert set(range(1, next_seq - len(kept))) <= missing
    gaps = [m["gap"] for m in received.values() if "gap" in m]
    covered = {seq for g in gaps for seq in range(g["from_seq"], g["to_seq"] + 1)}
    assert missing <= covered
    assert sum(g["messages"] for g in gaps) == len(missing) == final.dropped_messages
    assert sum(g["samples"] for g in gaps) == final.dropped_samples
    # the first message sent after the drops carries a gap record of older seqs (the agent keeps
    # appending until it reconnects, so more may have been dropped after the snapshot above)
    first_after = next(m.json() for m in recorder.messages(TELEMETRY) if m.json()["seq"] >= kept[0])
    assert "gap" in first_after
    assert first_after["gap"]["from_seq"] <= first_after["gap"]["to_seq"] < first_after["seq"]
    assert final.depth == 0


# ------------------------------------------------------------------------------------- bad TLS


@pytest.mark.parametrize("trap", ["wrong_ca", "expired_cert"])
async def test_bad_tls_is_reported_clearly_and_the_agent_keeps_buffering(tmp_path: Path, broker: Broker, pki: Pki,
                                                                          trap: str) -> None:
    if trap == "wrong_ca":  # the agent trusts a CA that did not sign the broker's certificate
        options: dict[str, Any] = {"ca": pki.other_ca_cert}
        expected = ("not trusted", str(pki.other_ca_cert))
    else:  # our own client certificate expired yesterday
        options = {"cert": pki.expired_cert, "key": pki.expired_key}
        expected = ("expired", str(pki.expired_cert))
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = Agent(agent_config(tmp_path, broker, pki, **options), driver_factory=counting().driver)
        await agent.start()
        assert agent.outbox is not None and agent.sync is not None
        outbox, link, twin = agent.outbox, agent.sync.link, TwinView.open(agent.config.twin_path)
        try:
            def p0() -> Any:
                return {r["name"]: r["value"] for r in twin.current()}["dev.p0"]

            await wait_for(lambda: all(s in link.last_error for s in expected) and p0() is not None, timeout=15,
                           what=f"last_error naming {expected}")
            depth, stored, value = outbox.stats().depth, agent.stored, p0()
            # Several retries later: still buffering, the twin still updating, the same clear error.
            await wait_for(lambda: outbox.stats().depth >= depth + 10 and agent.stored >= stored + 30, timeout=20,
                           what="the outbox and the twin growing")
            # the points table is refreshed once per twin.points_interval (1 s)
            await wait_for(lambda: p0() > value, timeout=10, what="the twin's current value moving on")
            assert all(s in link.last_error for s in expected), link.last_error
            assert link.connects == 0 and not link.connected.is_set()
            assert {"mqtt-link", "mqtt-batcher", "mqtt-drain", "twin-writer", "device:dev"} <= running_task_names()
        finally:
            await agent.stop()
        assert recorder.messages() == []  # nothing got through


# ------------------------------------------------------------------------- external subscriber


async def test_mosquitto_sub_sees_documented_topics_and_valid_payloads(tmp_path: Path, broker: Broker,
                                                                      pki: Pki) -> None:
    """A subscriber this project did not write: mosquitto_sub from mosquitto-clients."""
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        pytest.fail("mosquitto_sub is not installed (apt-get install mosquitto-clients; ./dev.sh installs it)")
    agent = Agent(agent_config(tmp_path, broker, pki), driver_factory=counting().driver)
    await agent.start()
    assert agent.sync is not None
    sync = agent.sync
    await wait_for(lambda: sync.acked >= 3, timeout=15, what="state, twin and telemetry at the broker")
    sub = await asyncio.create_subprocess_exec(
        binary, "--cafile", str(pki.ca_cert), "--cert", str(pki.operator_cert), "--key", str(pki.operator_key),
        "-h", "localhost", "-p", str(broker.port), "-t", "edge/#", "-q", "1", "-F", "%r %t %p", "-W", "30",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines: list[tuple[bool, str, Any]] = []
    try:
        assert sub.stdout is not None
        while not ({"state", "twin", "events"} <= {t.rsplit("/", 1)[1] for _, t, _ in lines}
                   and sum(t == TELEMETRY for _, t, _ in lines) >= 5):
            line = await asyncio.wait_for(sub.stdout.readline(), 30)
            assert line, f"mosquitto_sub ended: {(await sub.stderr.read()).decode() if sub.stderr else ''}"
            retained, topic, payload = line.decode().rstrip("\n").split(" ", 2)
            lines.append((retained == "1", topic, json.loads(payload)))
            if len(lines) == 1:  # subscribed (the retained state came): now an event it can see
                await agent.sync.append([agent.sync.event("test", {"note": "seen by mosquitto_sub"})])
    finally:
        if sub.returncode is None:
            sub.terminate()
        await sub.wait()
        await agent.stop()
    assert {t for _, t, _ in lines} == {STATE, TWIN, TELEMETRY, EVENTS}
    for _, topic, body in lines:
        kind = topic.rsplit("/", 1)[1]
        assert validate(body, load_schema(kind)) == [], (topic, body)
        assert body["gateway"] == AGENT_CN
    # The retained snapshots reach a late subscriber as retained messages.
    assert next(r for r, t, _ in lines if t == STATE) and next(r for r, t, _ in lines if t == TWIN)
    assert next(b for _, t, b in lines if t == STATE)["state"] == "online"
    assert next(b for _, t, b in lines if t == EVENTS)["note"] == "seen by mosquitto_sub"
    telemetry_seqs = [b["seq"] for _, t, b in lines if t == TELEMETRY]
    assert telemetry_seqs == list(range(telemetry_seqs[0], telemetry_seqs[0] + len(telemetry_seqs)))


# ------------------------------------------------------------------------------------ MQTT 3.1.1


async def test_mqtt_311_end_to_end_with_offline_will(tmp_path: Path, broker: Broker, pki: Pki) -> None:
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = Agent(agent_config(tmp_path, broker, pki, mqtt={"version": "3.1.1"}), driver_factory=counting().driver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda ms: len(ms) >= 5, timeout=20, topic=TELEMETRY)
        finally:
            await agent.stop()
        await recorder.wait_for_async(lambda ms: ms and ms[-1].json()["state"] == "offline", timeout=10, topic=STATE)
    assert f"as {AGENT_CN} (p2," in broker.log()  # mosquitto logs MQTT 3.1.1 as p2 (its mosq_p_mqtt311), 5 as p5
    assert [m.json()["state"] for m in recorder.messages(STATE)] == ["online", "offline"]
    received = by_seq(recorder.messages(TELEMETRY))
    assert sorted(received) == list(range(1, max(received) + 1))
    assert samples(received) == history(tmp_path / "data")
    assert recorder.messages(TWIN) and all(validate(m.json(), load_schema("twin")) == []
                                           for m in recorder.messages(TWIN))
    # The Will is retained: a subscriber arriving later is told the gateway is offline.
    with Recorder(broker, STATE) as late:
        offline = await late.wait_for_async(lambda ms: ms, timeout=10)
    assert offline[0].retain and offline[0].json()["state"] == "offline"
    assert validate(offline[0].json(), load_schema("state")) == []
