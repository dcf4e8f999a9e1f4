"""Events and writes have a retention; viewers' queries are bounded and streamed; the terminal is safe.

Issue 11, finding 8: ``events`` and ``writes`` were never pruned, and ``twin events`` and the remote
``events``/``audit`` loaded every row since ``since`` into memory. Finding 11: control characters in
an operator name (or any message) reached the terminal raw through ``twin events``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.store.twin import Twin
from edge_agent.store.views import TwinView
from tests import builders
from tests.fakes import FakePlant
from tests.helpers import wait_for

DAY = 86400.0


def _config(tmp_path: Path, **twin: str) -> Path:
    dev = builders.modbus("dev", [builders.point("dev.pv", address=0)], interval="100ms")
    doc = builders.config(tmp_path / "data", twin={"flush_interval": "50ms", **twin}, devices=[dev])
    path = tmp_path / "agent.toml"
    builders.write(doc, path)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True, timeout=120)


def _old_rows(path: Path, now: float) -> None:
    """Events and write records 1 day, 10 days and 100 days old, and one of each now."""
    twin = Twin.open(path)
    try:
        for age in (100 * DAY, 10 * DAY, DAY, 0.0):
            twin.add_event({"ts": now - age, "source": "test", "kind": "alarm", "state": "raised",
                            "message": f"{age / DAY:g} days old"})
            twin.record_write({"ts": now - age, "source": "local", "point": "dev.pv", "requested": 1.0,
                               "result": "rejected", "reason": f"{age / DAY:g} days old", "configured": False})
    finally:
        twin.close()


async def test_events_and_writes_are_pruned_past_their_retention(tmp_path: Path) -> None:
    source = _config(tmp_path, events_retention="7d", writes_retention="30d", prune_interval="1s")
    cfg = config.load(source)
    assert (cfg.twin.events_retention, cfg.twin.writes_retention) == (7 * DAY, 30 * DAY)
    (tmp_path / "defaults").mkdir()
    defaults = config.load(_config(tmp_path / "defaults")).twin
    assert (defaults.events_retention, defaults.writes_retention) == (90 * DAY, 365 * DAY)
    _old_rows(cfg.twin_path, time.time())
    agent = Agent(cfg, driver_factory=FakePlant(default=1.0).driver)
    await agent.start()
    try:
        def left() -> tuple[list[str], list[str]] | None:
            with TwinView.open(cfg.twin_path) as twin:
                events = [e["message"] for e in twin.events() if e["source"] == "test"]
                writes = [w["reason"] for w in twin.writes()]
            return (events, writes) if len(events) == 2 and len(writes) == 3 else None

        events, writes = await wait_for(left, timeout=30, what="old events and writes pruned")  # first prune at 10 s
    finally:
        await agent.stop()
    assert events == ["1 days old", "0 days old"]
    assert writes == ["10 days old", "1 days old", "0 days old"]


def test_twin_events_streams_and_escapes_control_characters(tmp_path: Path) -> None:
    source = _config(tmp_path)
    path = tmp_path / "data" / "twin.db"
    twin = Twin.open(path)
    now = time.time()
    try:
        twin.add_event({"ts": now, "source": "commands", "kind": "command", "state": "forbidden",
                        "message": 'mallory\x1b]0;owned\x07\x1b[2J\r: write: forbidden \u202etxt.exe'})
        with twin.transaction() as conn:  # 30,000 events of 2 KB: 60 MB of messages
            conn.executemany("INSERT INTO events (ts, source, kind, state, message) VALUES (?, ?, ?, ?, ?)",
                             ((now, "bulk", "note", "info", f"{i:06d}" + "m" * 2000) for i in range(30_000)))
    finally:
        twin.close()

    shown = _cli("twin", "events", "--config", str(source), "--since", "1h")
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[1]
    assert "\x1b" not in shown.stdout and "\r" not in shown.stdout and "\u202e" not in shown.stdout
    assert "mallory\\x1b]0;owned\\x07\\x1b[2J\\r: write: forbidden \\u202etxt.exe" in first, first
    assert len(shown.stdout.splitlines()) == 1 + 30_001

    as_json = _cli("twin", "events", "--config", str(source), "--since", "1h", "--json")
    rows = json.loads(as_json.stdout)
    assert len(rows) == 30_001 and rows[0]["message"].startswith("mallory\x1b]0;owned")  # JSON escapes, losslessly
    assert rows[-1]["message"].startswith("029999")

    # the whole listing never sits in memory: peak RSS of the CLI stays far below the 60 MB it printed
    probe = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-m', 'edge_agent.cli', 'twin', "
             f"'events', '--config', {str(source)!r}, '--since', '1h', '--json'], stdout=subprocess.DEVNULL, "
             "check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peak_kib = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                  timeout=120).stdout)
    print(f"\ntwin events --json of 60 MB: peak RSS {peak_kib / 1024:.0f} MiB")
    assert peak_kib < 100 * 1024, f"peak RSS {peak_kib} KiB"
