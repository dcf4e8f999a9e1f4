"""The agent against real protocol servers (the simulated plant), and the CLI as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from edge_agent.demo.plant import Plant
from edge_agent.demo.runner import demo_config
from edge_agent.store.views import TwinView
from tests import builders
from tests.helpers import free_port, wait_for, wait_for_sync


def _current(agent: Agent) -> dict[str, dict[str, Any]]:
    with TwinView.open(agent.config.twin_path) as twin:
        return {r["name"]: r for r in twin.current()}


def _qualities(agent: Agent, device: str) -> set[str]:
    return {r["quality"] for r in _current(agent).values() if r["device"] == device}


async def test_mirrors_plant_and_survives_each_server_going_away(tmp_path: Path) -> None:
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=3, speed=5.0) as plant:
        cfg, _ = demo_config(plant.opcua_endpoint, plant.modbus_port, tmp_path)
        agent = Agent(cfg)
        await agent.start()
        try:
            names = {p.name for _, p in cfg.points()}
            await wait_for(lambda: {n for n, r in _current(agent).items() if r["quality"] == "good"} == names,
                           timeout=20, what="every point good")
            # values are the plant's (flow decoded from float32 registers, motor temp scaled x10)
            truth = plant.readings()
            now = _current(agent)
            assert abs(now["chiller1.setpoint"]["value"] - truth["chiller1.setpoint"]) < 1e-6
            assert now["pump1.flow"]["unit"] == "m3/h" and now["pump1.flow"]["value"] > 0

            await plant.set_modbus_online(False)
            await wait_for(lambda: _qualities(agent, "pump1") <= {"bad", "stale"}, timeout=15, what="pump bad")
            before = _current(agent)["chiller1.energy"]["value"]
            await wait_for(lambda: _current(agent)["chiller1.energy"]["value"] != before, timeout=10,
                           what="chiller still mirrored while the pump is away")
            assert _qualities(agent, "chiller1") == {"good"}
            await plant.set_modbus_online(True)
            await wait_for(lambda: _qualities(agent, "pump1") == {"good"}, timeout=30, what="pump recovered")

            await plant.set_opcua_online(False)
            await wait_for(lambda: _qualities(agent, "chiller1") <= {"bad", "stale"}, timeout=20,
                           what="chiller bad")
            assert _qualities(agent, "pump1") == {"good"}
            await plant.set_opcua_online(True)
            await wait_for(lambda: _qualities(agent, "chiller1") == {"good"}, timeout=40, what="chiller recovered")
            assert agent.runners["chiller1"].status.state == "up"
        finally:
            await agent.stop()


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_run_then_sigterm_exits_zero_and_twin_cli_reads_it(tmp_path: Path) -> None:
    """`edge-agent run` against a plant in another process; SIGTERM stops it cleanly."""
    opcua, modbus = free_port(), free_port()
    plant = subprocess.Popen([sys.executable, "-m", "edge_agent.demo.plant", "--opcua-port", str(opcua),
                              "--modbus-port", str(modbus)], stderr=subprocess.DEVNULL)
    try:
        _, text = demo_config(f"opc.tcp://127.0.0.1:{opcua}/plant", modbus, tmp_path)
        config_file = tmp_path / "agent.toml"
        config_file.write_text(text)
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config_file)],
                                 stderr=subprocess.PIPE, text=True)
        try:
            def all_good() -> bool:
                result = _cli("twin", "show", "--config", str(config_file), "--json")
                if result.returncode != 0:
                    return False
                rows = json.loads(result.stdout)
                return bool(rows) and all(r["quality"] == "good" for r in rows)

            wait_for_sync(all_good, timeout=30, what="twin show: every point good")
            started = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=10) == 0
            assert time.monotonic() - started < 5
        finally:
            if agent.poll() is None:
                agent.kill()
            stderr = agent.stderr.read() if agent.stderr else ""
        assert "agent stopped" in stderr
        rows = json.loads(_cli("twin", "show", "--config", str(config_file), "--json").stdout)
        assert {"name", "value", "quality", "ts", "unit"} <= set(rows[0])
        flow = next(r for r in rows if r["name"] == "pump1.flow")
        assert isinstance(flow["value"], float) and flow["unit"] == "m3/h"
        history = _cli("twin", "history", "--config", str(config_file), "pump1.flow", "--since", "5m", "--json")
        samples = json.loads(history.stdout)
        assert history.returncode == 0 and len(samples) >= 1 and samples[-1]["quality"] == "good"
        table = _cli("twin", "show", "--config", str(config_file))
        assert table.returncode == 0 and "pump1.flow" in table.stdout and "m3/h" in table.stdout
        missing = _cli("twin", "history", "--config", str(config_file), "nope")
        assert missing.returncode == 1 and 'no point named "nope"' in missing.stderr
    finally:
        plant.send_signal(signal.SIGINT)
        try:
            plant.wait(timeout=10)
        except subprocess.TimeoutExpired:
            plant.kill()


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    bad = builders.write({"agent": {"id": "x", "bogus": 1}}, tmp_path / "agent.toml")
    result = _cli("run", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}: agent.bogus: unknown key"
    assert not (tmp_path / "data").exists(), "a bad config must not create anything"


def test_demo_runs_and_summarises(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "demo", "--duration", "6",
                             "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, result.stderr
    assert "summary:" in result.stdout
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("summary:"))
    good, total = line.split(";")[1].split()[0].split("/")
    assert int(total) > 10 and int(good) == int(total), line
    assert (tmp_path / "agent.toml").exists() and (tmp_path / "twin.db").exists()
