"""`edge-agent run` as systemd runs it: a real process, a NOTIFY_SOCKET bound by the test, signals.

The agent runs as a subprocess against the simulated plant (another subprocess, shared by the
module). The test plays systemd: it binds a unix datagram socket, hands its path to the agent in
$NOTIFY_SOCKET with $WATCHDOG_USEC=1 s (so a ping every 0.5 s), and records every datagram.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from edge_agent.demo.runner import demo_config
from edge_agent.store.views import TwinView
from tests import builders
from tests.helpers import NotifyReceiver, free_port, wait_for_sync
from tests.mqtt_broker import Pki

WATCHDOG_USEC = 1_000_000  # systemd's WatchdogSec=1s: the agent pings every 0.5 s
PUMP_POINTS = {"pump1.flow", "pump1.pressure", "pump1.speed", "pump1.power", "pump1.flow_total",
               "pump1.speed_setpoint", "pump1.motor_temp", "pump1.running", "pump1.overtemp"}


# ------------------------------------------------------------------------------------------ plumbing


class Notifications(NotifyReceiver):
    """The notify socket an agent subprocess is given: a path in the test's folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        super().__init__(sock, str(path))

    def index(self, key: str, start: int = 0) -> int | None:
        """Position of the first message at or after ``start`` that carries ``key``."""
        return next((i for i, m in enumerate(self.all()) if i >= start and key in m), None)

    def wait(self, key: str, start: int = 0, timeout: float = 20.0) -> int:
        """Wait for a message carrying ``key`` at or after position ``start``; returns its position."""
        wait_for_sync(lambda: self.index(key, start) is not None, timeout=timeout, what=f"{key}= from the agent")
        index = self.index(key, start)
        assert index is not None
        return index

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.all() if "STATUS" in m]


@dataclass
class RunningAgent:
    """One `edge-agent run` subprocess, its log file and what it told the notify socket."""

    process: subprocess.Popen[bytes]
    config: Path
    log_path: Path
    notify: Notifications
    started: float = field(default_factory=time.monotonic)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def messages(self, level: str | None = None) -> list[str]:
        """The ``msg`` of every log line (key=value text or JSON lines), optionally of one level."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                fields = {"level": record.get("level", ""), "msg": record.get("msg", "")}
            else:
                head, sep, rest = line.partition(" msg=")
                if not sep:
                    continue
                msg = json.JSONDecoder().raw_decode(rest)[0] if rest.startswith('"') else rest.split(" ", 1)[0]
                fields = {"level": next((w[6:] for w in head.split() if w.startswith("level=")), ""), "msg": msg}
            if level is None or fields["level"] == level:
                found.append(str(fields["msg"]))
        return found


@contextmanager
def running_agent(tmp_path: Path, config: Path) -> Iterator[RunningAgent]:
    """Start the agent as systemd would (Type=notify, WatchdogSec=1s); kill it on the way out."""
    notify = Notifications(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}}
    env |= {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    log_path = tmp_path / "agent.log"
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        agent = RunningAgent(process, config, log_path, notify)
        try:
            yield agent
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)
    finally:
        notify.close()


@dataclass(frozen=True)
class PlantPorts:
    opcua: int
    modbus: int

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.opcua}/plant"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def plant() -> Iterator[PlantPorts]:
    """The simulated plant (OPC UA chiller, Modbus pump) in its own process, for the whole module."""
    ports = PlantPorts(free_port(), free_port())
    process = subprocess.Popen([sys.executable, "-m", "edge_agent.demo.plant", "--opcua-port", str(ports.opcua),
                                "--modbus-port", str(ports.modbus)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_sync(lambda: process.poll() is not None or (_accepts(ports.opcua) and _accepts(ports.modbus)),
                      timeout=30, what="the plant's servers")
        assert process.poll() is None, f"the plant exited with {process.returncode}"
        yield ports
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def write_config(tmp_path: Path, plant: PlantPorts, *, modbus_port: int | None = None, extra: str = "") -> Path:
    """The packaged demo.toml with the plant's ports (or the pump at ``modbus_port``), data in tmp_path."""
    _, text = demo_config(plant.endpoint, plant.modbus if modbus_port is None else modbus_port, tmp_path)
    path = tmp_path / "agent.toml"
    path.write_text(text + extra)
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (a device or broker that is away)."""
    port = free_port()
    assert not _accepts(port)
    return port


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=60)


def twin_rows(config: Path) -> dict[str, dict[str, Any]]:
    """`edge-agent twin show --json`, by point name ({} until the twin exists)."""
    result = cli("twin", "show", "--config", str(config), "--json")
    if result.returncode != 0:
        return {}
    return {row["name"]: row for row in json.loads(result.stdout)}


def twin_points(config: Path) -> set[str]:
    """The points table, read from the twin file itself (works while the config file is broken)."""
    twin = TwinView.open(config.parent / "twin.db")
    try:
        return {row["name"] for row in twin.current()}
    finally:
        twin.close()


def history_count(config: Path, prefix: str = "") -> int:
    """History rows in the twin (of the points whose name starts with ``prefix``)."""
    path = config.parent / "twin.db"
    if not path.exists():
        return 0
    with TwinView.open(path) as twin:
        row = twin.db.execute("SELECT count(*) FROM history WHERE point LIKE ?", (prefix + "%",)).fetchone()
    return int(row[0])


def status(config: Path, *, as_json: bool = False) -> subprocess.CompletedProcess[str]:
    return cli("status", "--config", str(config), *(["--json"] if as_json else []))


def status_json(config: Path) -> dict[str, Any]:
    result = status(config, as_json=True)
    try:
        data: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}
    data["exit"] = result.returncode
    return data


def device(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next((d for d in data.get("devices", []) if d["name"] == name), {})


# ------------------------------------------------------------------------------------------- tests


def test_ready_status_and_watchdog_with_a_device_away(tmp_path: Path, plant: PlantPorts) -> None:
    config = write_config(tmp_path, plant, modbus_port=closed_port())
    with running_agent(tmp_path, config) as agent:
        ready = agent.notify.wait("READY", timeout=30)
        first = agent.notify.all()[ready]
        # READY does not wait for the devices: the pump can never connect, and READY came anyway,
        # saying so in the same datagram.
        assert first["READY"] == "1"
        assert first["STATUS"].startswith(("0/2 devices up (down: ", "1/2 devices up (down: "))
        assert "pump1" in first["STATUS"]
        assert agent.process.poll() is None
        # The one-line summary follows the devices: the chiller comes up, the pump stays down.
        wait_for_sync(lambda: "1/2 devices up (down: pump1)" in agent.notify.statuses(), timeout=30,
                      what="STATUS naming the down pump")
        assert all("\n" not in s for s in agent.notify.statuses())

        # WATCHDOG=1 every half WATCHDOG_USEC, from the event loop, not a flood.
        wait_for_sync(lambda: sum("WATCHDOG" in m for m in agent.notify.all()) >= 5, timeout=15,
                      what="five WATCHDOG=1 pings")
        pings = [t for t, m in list(agent.notify.messages) if "WATCHDOG" in m]
        assert all(m["WATCHDOG"] == "1" for m in agent.notify.all() if "WATCHDOG" in m)
        gaps = [b - a for a, b in pairwise(pings)]
        assert min(gaps) > 0.25, gaps  # paced at 0.5 s (a little jitter in the reader thread)
        assert statistics.median(gaps) < 1.5, gaps  # well inside WatchdogSec=1s
        assert not any("STOPPING" in m or "RELOADING" in m for m in agent.notify.all())


def test_sighup_applies_a_good_edit_in_place(tmp_path: Path, plant: PlantPorts) -> None:
    config = write_config(tmp_path, plant)
    original = config.read_text()
    with running_agent(tmp_path, config) as agent:
        agent.notify.wait("READY", timeout=30)
        wait_for_sync(lambda: {n for n, r in twin_rows(config).items() if r["quality"] == "good"}
                      >= PUMP_POINTS | {"chiller1.power"}, timeout=30, what="both devices mirrored")
        chiller_rows = history_count(config, "chiller1.")
        counts = [history_count(config)]
        assert chiller_rows > 0 and counts[0] > 0

        # The edit: the chiller leaves (its whole [[devices]] block); the pump gets one more point, its
        # spare holding register 5 (the plant keeps it at 0).
        head, pump = original.split("# ---------------------------------------------------------------------------- "
                                    "pump, Modbus TCP")
        chiller_block = head[head.index("[[devices]]"):]
        # models and the optimiser work on the chiller: they leave with it
        rule = "# " + "-" * 76 + " "
        pump = pump[:pump.index(rule + "models")]
        edited = head.replace(chiller_block, "") + rule + "pump, Modbus TCP" + pump + (
            '\n  [[devices.points]]\n  name = "pump1.spare"\n  register = "holding"\n'
            '  address = 5\n  type = "uint16"\n')
        assert "chiller1" not in edited and pump
        config.write_text(edited)
        assert cli("check-config", "--config", str(config)).returncode == 0

        mark = len(agent.notify.all())
        before_us = time.monotonic_ns() // 1000
        agent.process.send_signal(signal.SIGHUP)
        reloading = agent.notify.wait("RELOADING", start=mark)

        def ready_again() -> bool:
            counts.append(history_count(config))
            return agent.notify.index("READY", reloading + 1) is not None

        wait_for_sync(ready_again, timeout=20, what="READY=1 after RELOADING=1")
        after_us = time.monotonic_ns() // 1000
        message = agent.notify.all()[reloading]
        assert message["RELOADING"] == "1"
        assert before_us <= int(message["MONOTONIC_USEC"]) <= after_us  # CLOCK_MONOTONIC, as systemd reads it
        first_ready = agent.notify.index("READY", mark)
        assert first_ready is not None and first_ready > reloading  # RELOADING=1 first, then READY=1

        # Applied: the twin's points are the new config's, and the new point is read.
        expected = PUMP_POINTS | {"pump1.spare"}

        def applied() -> bool:
            counts.append(history_count(config))
            rows = twin_rows(config)
            return set(rows) == expected and rows["pump1.spare"]["quality"] == "good"

        wait_for_sync(applied, timeout=30, what="the new point mirrored")
        assert twin_rows(config)["pump1.spare"]["value"] == 0
        wait_for_sync(lambda: "1/1 devices up" in agent.notify.statuses(), timeout=20, what="STATUS 1/1 up")

        # In place, nothing lost: same process, history only grew, the chiller's history kept.
        assert agent.process.poll() is None
        counts.append(history_count(config))
        assert counts == sorted(counts) and counts[-1] > counts[0], counts
        assert history_count(config, "chiller1.") >= chiller_rows
        logged = agent.messages("info")
        reloaded = [m for m in logged if m.startswith(f"config reloaded from {config}: ")]
        assert len(reloaded) == 1, logged
        # the chiller's models and the optimiser left with it
        assert reloaded[0] == (f"config reloaded from {config}: device chiller1 removed, device pump1 restarted, "
                               "model chiller-health removed, model chiller-sim removed, optimizer restarted")
        assert not any(m.startswith("agent stopped") for m in logged)  # a reload, not a restart of the agent
        wait_for_sync(lambda: status_json(config).get("config") == str(config)
                      and {d["name"] for d in status_json(config)["devices"]} == {"pump1"},
                      timeout=20, what="status.json showing the new device list")
        assert status_json(config)["pid"] == agent.process.pid


def test_sighup_refuses_a_bad_edit_and_logs_every_problem(tmp_path: Path, plant: PlantPorts) -> None:
    config = write_config(tmp_path, plant)
    original = config.read_text()
    with running_agent(tmp_path, config) as agent:
        agent.notify.wait("READY", timeout=30)
        wait_for_sync(lambda: {n for n, r in twin_rows(config).items() if r["quality"] == "good"}
                      >= PUMP_POINTS | {"chiller1.power"}, timeout=30, what="both devices mirrored")
        names = set(twin_rows(config))

        # Three problems in one edit: a misspelt type, an unknown key, an interval that is no duration.
        bad = (original.replace('type = "uint16"\n  unit = "rpm"\n\n', 'type = "flaot32"\n  unit = "rpm"\n\n', 1)
               .replace('site = "demo-plant"', 'site = "demo-plant"\nbogus = 1', 1)
               .replace('interval = "1s"\n\n  [[devices.points]]\n  name = "pump1.flow"',
                        'interval = "soon"\n\n  [[devices.points]]\n  name = "pump1.flow"', 1))
        config.write_text(bad)
        checked = cli("check-config", "--config", str(config))
        assert checked.returncode == 2
        problems = [line.removeprefix("error: ") for line in checked.stderr.splitlines()]
        assert len(problems) == 3 and all(line.startswith("error: ") for line in checked.stderr.splitlines())

        mark = len(agent.notify.all())
        agent.process.send_signal(signal.SIGHUP)
        reloading = agent.notify.wait("RELOADING", start=mark)
        ready = agent.notify.wait("READY", start=reloading + 1)

        # Every problem logged with check-config's own words, under one header line.
        logged = agent.messages("error")
        assert logged == [f"reload refused, the running config stays in place; 3 problem(s) in {config}:",
                          *problems], (logged, problems)

        # Still running with the old config: same points, still reading the pump, same process.
        rows = history_count(config, "pump1.")
        wait_for_sync(lambda: history_count(config, "pump1.") > rows, timeout=20, what="pump still polled")
        assert agent.process.poll() is None
        assert twin_points(config) == names
        assert not any(m.startswith(("config reloaded", "agent stopped")) for m in agent.messages())
        assert agent.notify.all()[ready]["STATUS"].startswith("2/2 devices up")  # the old config, both up


def test_sighup_survives_any_file_content(tmp_path: Path, plant: PlantPorts) -> None:
    """Deep nesting used to raise RecursionError out of the reload, and the daemon exited (issue 11)."""
    config = write_config(tmp_path, plant)
    original = config.read_text()
    hostile = {
        "nested arrays": original + "\nextra = " + "[" * 100_000 + "]" * 100_000 + "\n",
        "nested inline tables": original + "\nextra = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n",
        "nested dotted keys": original + "\n" + ".".join(["k"] * 50_000) + " = 1\n",
        "nan and inf durations": original.replace('[twin]', '[twin]\nflush_interval = nan\nprune_interval = inf', 1),
        "not UTF-8": "\udcff".encode("utf-8", "surrogateescape").decode("latin-1") * 1000,
    }
    with running_agent(tmp_path, config) as agent:
        agent.notify.wait("READY", timeout=30)
        for what, text in hostile.items():
            config.write_bytes(text.encode("latin-1") if what == "not UTF-8" else text.encode())
            mark = len(agent.notify.all())
            errors = len(agent.messages("error"))
            agent.process.send_signal(signal.SIGHUP)
            reloading = agent.notify.wait("RELOADING", start=mark)
            agent.notify.wait("READY", start=reloading + 1)
            assert agent.process.poll() is None, f"{what}: the agent exited:\n{agent.log()[-3000:]}"
            logged = agent.messages("error")[errors:]
            assert logged and logged[0].startswith("reload refused, the running config stays in place"), (what, logged)
            assert all(len(line) < 2000 for line in logged), what
        nested = [m for m in agent.messages("error") if "nested more than 32 levels deep" in m]
        assert len(nested) == 3, agent.messages("error")
        # still the old config, still polling
        rows = history_count(config.parent / "agent.toml", "pump1.")
        wait_for_sync(lambda: history_count(config, "pump1.") > rows, timeout=20, what="pump still polled")


def test_sigterm_sends_stopping_and_exits_zero_quickly(tmp_path: Path, plant: PlantPorts) -> None:
    config = write_config(tmp_path, plant)
    with running_agent(tmp_path, config) as agent:
        agent.notify.wait("READY", timeout=30)
        wait_for_sync(lambda: history_count(config, "pump1.") > 0, timeout=30, what="readings stored")
        mark = len(agent.notify.all())
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(15) == 0
        took = time.monotonic() - started
        stopping = agent.notify.wait("STOPPING", start=mark, timeout=5)
        assert agent.notify.all()[stopping]["STOPPING"] == "1"
        # After STOPPING=1 the watchdog pings end (systemd stops watching a stopping unit anyway).
        assert not any("WATCHDOG" in m for m in agent.notify.all()[stopping + 1:])
        assert took < 5, f"SIGTERM took {took:.1f} s"
        assert any(m.startswith("agent stopped;") for m in agent.messages("info"))
    assert status(config).returncode == 3


def test_status_names_what_is_wrong_then_not_running(tmp_path: Path, plant: PlantPorts, pki: Pki) -> None:
    pump_port, broker_port = closed_port(), closed_port()
    mqtt = builders.mqtt(pki, broker_port, host="127.0.0.1", retry_min="100ms", retry_max="500ms")
    config = write_config(tmp_path, plant, modbus_port=pump_port, extra="\n" + builders.toml({"mqtt": mqtt}))
    with running_agent(tmp_path, config) as agent:
        agent.notify.wait("READY", timeout=30)

        def diagnosed() -> dict[str, Any] | None:
            data = status_json(config)
            mqtt = data.get("mqtt") or {}
            settled = (device(data, "pump1").get("state") == "down" and device(data, "pump1").get("last_error")
                       and device(data, "chiller1").get("state") == "up" and mqtt.get("last_error"))
            return data if settled else None

        found = wait_for_sync(diagnosed, timeout=30, what="status showing the pump and the broker down")
        assert found is not None
        data = found
        assert data["exit"] == 0 and data["running"] is True and data["pid"] == agent.process.pid
        assert data["mqtt"]["connected"] is False and data["mqtt"]["broker"] == f"127.0.0.1:{broker_port}"
        pump_error = str(device(data, "pump1")["last_error"])
        broker_error = str(data["mqtt"]["last_error"])

        text = status(config)
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].startswith(f"edge-agent {data['version']} running (pid {agent.process.pid}), up ")
        pump_line = next(line for line in lines if line.strip().startswith("pump1 "))
        assert " down " in pump_line and pump_line.endswith(f"; error: {pump_error}")
        chiller_line = next(line for line in lines if line.strip().startswith("chiller1 "))
        assert " up " in chiller_line and "error" not in chiller_line
        assert any(line.startswith(f"mqtt: 127.0.0.1:{broker_port} NOT connected: ") for line in lines)
        assert any(broker_error in line for line in lines if line.startswith("mqtt: ")), (broker_error, lines)
        # The reasons name the address that failed, so a newcomer knows what to check.
        assert f"cannot connect to 127.0.0.1:{pump_port}" in pump_error, pump_error
        assert f"127.0.0.1:{broker_port}: connection refused" in broker_error, broker_error
        assert "recent warnings and errors:" in lines

        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait(10)
        dead = status(config)
        assert dead.returncode == 3
        assert dead.stdout.startswith("edge-agent is NOT running; last seen ")
        assert f"(pid {data['pid']})" in dead.stdout.splitlines()[0]
        assert pump_error in dead.stdout  # what was wrong when it died is still shown
        dead_json = status_json(config)
        assert dead_json["exit"] == 3 and dead_json["running"] is False


def test_status_without_a_status_file(tmp_path: Path, plant: PlantPorts) -> None:
    config = write_config(tmp_path, plant)
    result = status(config)
    assert result.returncode == 3
    assert result.stdout.strip() == (f"edge-agent is not running (no status in {tmp_path}; "
                                     "it has not run with this config)")
    assert not (tmp_path / "status.json").exists()
