"""The shipped anomaly model on the simulated plant's real servers: a fault is detected end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.demo.plant import Plant
from edge_agent.demo.runner import demo_config
from tests.helpers import free_port, wait_for


async def test_vibration_fault_raises_an_anomaly_and_not_before(tmp_path: Path) -> None:
    async with Plant(opcua_port=free_port(), modbus_port=free_port(), seed=11, speed=5.0) as plant:
        cfg, text = demo_config(plant.opcua_endpoint, plant.modbus_port, tmp_path)
        (tmp_path / "agent.toml").write_text(text)
        agent = Agent(cfg)
        await agent.start()
        try:
            health = agent.models["chiller-health"]
            await wait_for(lambda: health.status.evaluations >= 4, timeout=40, what="the model scoring normal data")
            assert not health.anomaly_active
            assert health.status.last_score is not None and health.status.last_score < 4.4
            assert agent.models["chiller-sim"].status.state == "ready"
            fault_at = time.time()
            plant.inject_fault("vibration")
            await wait_for(lambda: health.anomaly_active, timeout=60, what="the anomaly raised")
        finally:
            await agent.stop()
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "edge_agent.cli", "twin", "events", "--config",
                         str(tmp_path / "agent.toml"), "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    events = [e for e in json.loads(result.stdout) if e["kind"] == "anomaly"]
    assert events, result.stdout
    assert all(e["ts"] >= fault_at for e in events), "an anomaly was raised before the fault"
    first = events[0]
    assert (first["model"], first["state"], first["equipment"]) == ("chiller-health", "raised", "chiller1")
    assert first["score"] > 4.4
    history = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "edge_agent.cli", "twin", "history", "--config",
                         str(tmp_path / "agent.toml"), "chiller-health.score", "--json"],
        capture_output=True, text=True, timeout=60)
    scores = [s["value"] for s in json.loads(history.stdout)]
    assert len(scores) >= 5 and max(scores) > 4.4 and min(scores) < 4.4  # the score is a point with history
