"""A fault in one SQLite file degrades that part, loudly, and the agent runs on (issue 11, finding 7).

Real files and real faults: garbage where a database should be, a directory where a file should
be, a disk that fills up (SQLite's own ``max_page_count`` gives the writer the same
"database or disk is full" a full file system gives), a file another process keeps locked.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.store.views import TwinView
from tests import builders
from tests.commanding import Keys, Operator, config_text, envelope, write_config
from tests.fakes import FakePlant
from tests.helpers import wait_for
from tests.mqtt_broker import Broker, Pki, Recorder

GARBAGE = b"this is not a database, it is what a bad sector or a stray cp leaves behind\n" * 100


def storage_events(agent: Agent) -> list[dict[str, object]]:
    with TwinView.open(agent.config.twin_path) as twin:
        return [e for e in twin.events() if e["kind"] == "storage"]


async def test_corrupt_and_unopenable_files_are_set_aside_and_the_agent_runs(tmp_path: Path, broker: Broker,
                                                                            pki: Pki, keys: Keys) -> None:
    """Before: a corrupt twin, or only a bad cloud outbox, stopped the whole agent at start."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "twin.db").write_bytes(GARBAGE)
    (data / "outbox.db").mkdir()  # cannot be opened as a file at all
    (data / "outbox.db" / "keep.txt").write_text("whatever was here")
    (data / "commands.db").write_bytes(GARBAGE)
    text = config_text(tmp_path, broker, pki, keys)
    plant = FakePlant(default=5.0)
    with Recorder(broker, "edge/plant-a/gw-01/#") as recorder:
        agent = Agent(write_config(tmp_path, text), driver_factory=plant.driver)
        await agent.start()
        try:
            assert agent.sync is not None
            await wait_for(lambda: agent.sync is not None and agent.sync.link.connected.is_set()
                           and agent.runners["dev"].status.state == "up", timeout=15, what="connected and up")
            aside = sorted(p.name for p in data.iterdir() if ".corrupt-" in p.name)
            assert [n.split(".corrupt-")[0] for n in aside] == ["commands.db", "outbox.db", "twin.db"], aside
            twin_aside = next(data.glob("twin.db.corrupt-*"))
            assert twin_aside.read_bytes() == GARBAGE  # kept for inspection, untouched
            assert (next(data.glob("outbox.db.corrupt-*")) / "keep.txt").read_text() == "whatever was here"
            status = agent.status()
            assert len(status.storage) == 2 and all("moved to" in s for s in status.storage), status.storage
            assert status.to_json()["storage"] == list(status.storage)
            events = await wait_for(lambda: len(storage_events(agent)) >= 3 and storage_events(agent),
                                    what="a storage event per file set aside")
            assert {str(e["state"]) for e in events} == {"set_aside"}
            # the fresh files work: history is stored, telemetry and commands flow
            await wait_for(lambda: agent.stored > 0, what="history stored in the fresh twin")
            ping = envelope(keys, "carol", "ping", issued=time.time() + 2)  # signed after the store was reset
            assert (await Operator(recorder).ask(ping))["ok"] is True
            # a command signed before the replay store was lost may have run already: refused
            old = envelope(keys, "carol", "ping", issued=time.time() - 30)
            assert (await Operator(recorder).ask(old))["error"]["code"] == "replayed"
        finally:
            await agent.stop()


async def test_a_full_disk_keeps_polling_and_writing_resumes_when_space_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: pollers stopped once four flush_max readings waited, and every flush logged an ERROR."""
    dev = builders.modbus("dev", [builders.point("dev.pv", address=0)], interval="20ms")
    cfg = builders.load(builders.config(tmp_path / "data", twin={"flush_interval": "50ms", "flush_max": 10},
                                        devices=[dev]), tmp_path / "agent.toml")
    plant = FakePlant(counting=True, accepts_writes=False)
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    agent = Agent(cfg, driver_factory=plant.driver)
    await agent.start()
    try:
        assert agent.writer is not None
        writer = agent.writer
        await wait_for(lambda: agent.stored > 20, what="history stored")
        pages = writer.twin.conn.execute("PRAGMA page_count").fetchone()[0]
        writer.twin.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full now
        await wait_for(lambda: writer.failing_since is not None, what="the first failed flush")
        reads = plant.device("dev").reads
        await wait_for(lambda: plant.device("dev").reads > reads + 100, timeout=20, what="polling going on")
        assert writer.pending_count <= 4 * 10 + 1
        assert writer.dropped > 0
        assert agent.latest["dev.pv"].value >= reads + 100  # the latest value is in memory all along
        state = agent.status().to_json()["twin"]
        assert state["writing"] is False and "database or disk is full" in state["last_error"], state
        assert "twin NOT writing" in agent.status().summary()
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "full" in r.getMessage()]
        assert len(loud) == 1, [r.getMessage() for r in loud]

        stored = agent.stored
        writer.twin.conn.execute("PRAGMA max_page_count = 1073741823")  # space is back
        await wait_for(lambda: writer.failing_since is None and agent.stored > stored, what="writing again")
        assert agent.status().to_json()["twin"]["writing"] is True
        back = [r.getMessage() for r in caplog.records if "writing again after" in r.getMessage()]
        assert len(back) == 1 and back[0].endswith("readings were let go while it could not be written"), back
    finally:
        await agent.stop()
    with TwinView.open(cfg.twin_path) as twin:
        values = [row["value"] for row in twin.history("dev.pv", 0)]
    assert values == sorted(values) and values[-1] >= reads + 100  # what was kept is in order, up to the end


async def test_a_twin_locked_at_start_still_starts_and_catches_up(tmp_path: Path) -> None:
    """Before: a twin that could not be written at start (disk full, locked) stopped the agent."""
    dev = builders.modbus("dev", [builders.point("dev.pv", address=0)], interval="50ms")
    cfg = builders.load(builders.config(tmp_path / "data", twin={"flush_interval": "50ms"}, devices=[dev]),
                        tmp_path / "agent.toml")
    first = Agent(cfg, driver_factory=FakePlant(default=1.0).driver)
    await first.start()
    await first.stop()
    other = sqlite3.connect(cfg.twin_path, isolation_level=None)  # another process keeps a write lock
    other.execute("BEGIN EXCLUSIVE")
    agent = Agent(cfg, driver_factory=FakePlant(default=2.0).driver)
    try:
        began = time.monotonic()
        await agent.start()
        assert time.monotonic() - began < 15
        assert agent.writer is not None
        await wait_for(lambda: agent.runners["dev"].status.state == "up", what="the device up")
        assert agent.status().storage == ()  # a locked file is fine: nothing set aside
        other.execute("ROLLBACK")
        other.close()
        await wait_for(lambda: agent.stored > 0 and agent.writer is not None and agent.writer.failing_since is None,
                       timeout=30, what="stored once the lock is gone")
    finally:
        await agent.stop()
    assert not list(cfg.agent.data_dir.glob("*.corrupt-*"))
    with TwinView.open(cfg.twin_path) as twin:
        assert twin.current()[0]["value"] == 2.0
