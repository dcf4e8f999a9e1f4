"""``edge-agent demo``: a simulated plant on real protocol servers, the agent against it, a live view.

The plant (edge_agent/plant.py) serves a chiller over OPC UA and a pump over Modbus TCP on free
loopback ports. The agent runs with config/demo.toml, its endpoint and port swapped for those
ports in memory, and a data folder of its own. The effective config is saved beside the twin
so ``edge-agent twin show --config DATA_DIR/agent.toml`` works after the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from edge_agent import config as config_mod
from edge_agent.agent import Agent
from edge_agent.errors import ConfigError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.toml"


def demo_config(opcua_endpoint: str, modbus_port: int, data_dir: Path) -> tuple[config_mod.AgentConfig, str]:
    """config/demo.toml with the plant's live ports and the given data folder, validated.

    Returns the config and its text (comments kept), which the demo saves beside the twin.
    """
    if not DEMO_CONFIG.exists():
        raise ConfigError([f"{DEMO_CONFIG}: no such file (the demo runs from a source checkout)"])
    text = DEMO_CONFIG.read_text()
    text = re.sub(r'(?m)^(endpoint\s*=\s*)"opc\.tcp://[^"]*"', lambda m: f'{m.group(1)}"{opcua_endpoint}"', text)
    text = re.sub(r"(?m)^(port\s*=\s*)\d+", lambda m: f"{m.group(1)}{modbus_port}", text)
    text = re.sub(r'(?m)^(data_dir\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"."', text)
    return config_mod.loads(text, data_dir / "agent.toml"), text


def _render(agent: Agent, plant: Any, started: float, out: TextIO, live: bool) -> None:
    rows = []
    for owner, point in agent.config.points():
        reading = agent.latest.get(point.name)
        value = "-" if reading is None or reading.value is None else (
            f"{reading.value:.3f}" if isinstance(reading.value, float) else str(reading.value))
        quality = reading.quality if reading else "-"
        age = f"{time.time() - reading.ts:5.1f}s" if reading else "-"
        rows.append((point.name, value, point.unit, quality, age, owner.name))
    devices = "  ".join(f"{r.device.name}={r.status.state}" for r in agent.runners.values())
    header = (f"edge-agent demo  t={time.time() - started:5.1f}s  devices: {devices}  "
              f"stored={agent.stored} rows")
    if live:
        out.write("\x1b[H\x1b[2J")
    out.write(header + "\n")
    if live:
        out.write(f"{'point':28} {'value':>12} {'unit':6} {'quality':9} {'age':>7}  device\n")
        for name, value, unit, quality, age, device_name in rows:
            out.write(f"{name:28} {value:>12} {unit:6} {quality:9} {age:>7}  {device_name}\n")
        snap = plant.snapshot()
        meters = ", ".join(f"{k}={v:.3f} kWh" for k, v in snap.items() if k.endswith("energy"))
        out.write(f"\nplant meters (simulated {snap.get('elapsed_s', 0):.0f} s): {meters}\n")
    out.flush()


async def _demo(duration: float, data_dir: Path, out: TextIO) -> int:
    from edge_agent.plant import Plant, free_port

    plant = Plant(opcua_port=free_port(), modbus_port=free_port(), seed=7)
    await plant.start()
    try:
        config, effective = demo_config(plant.opcua_endpoint, plant.modbus_port, data_dir)
        await asyncio.to_thread(_save, data_dir, effective)
        agent = Agent(config)
        await agent.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        started = time.time()
        live = out.isatty()
        try:
            while time.time() - started < duration and not stop.is_set():
                _render(agent, plant, started, out, live)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0 if live else 5.0):
                        await stop.wait()
        finally:
            await agent.stop()
        _summary(agent, config, started, out)
    finally:
        await plant.stop()
    return 0


def _save(data_dir: Path, effective: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "agent.toml").write_text(effective)


def _summary(agent: Agent, config: config_mod.AgentConfig, started: float, out: TextIO) -> None:
    from edge_agent.twin import Twin

    twin = Twin.open(config.twin_path, readonly=True)
    try:
        points = twin.current()
        history = twin.conn.execute("SELECT count(*) FROM history").fetchone()[0]
    finally:
        twin.close()
    good = sum(1 for p in points if p["quality"] == "good")
    out.write(f"\nsummary: ran {time.time() - started:.0f} s; {good}/{len(points)} points good; "
              f"{history} history rows in {config.twin_path}\n")
    for runner in agent.runners.values():
        s = runner.status
        traffic = f"{s.updates} readings by subscription" if runner.subscribe else f"{s.reads} polls"
        out.write(f"  device {s.name} ({s.protocol}): {s.state}, {traffic}, {s.read_errors} errors\n")
    out.write(f"inspect it:  edge-agent twin show --config {config.source}\n")
    out.flush()


def run_demo(duration: float = 60.0, data_dir: str | None = None, out: TextIO = sys.stdout) -> int:
    """Run the demo for ``duration`` seconds; returns the exit status."""
    folder = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    return asyncio.run(_demo(duration, folder.resolve(), out))
