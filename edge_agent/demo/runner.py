"""``edge-agent demo``: a simulated plant on real protocol servers, the agent against it, a live view.

The plant (:mod:`edge_agent.demo.plant`) serves a chiller over OPC UA and a pump over Modbus TCP
on free loopback ports. The agent runs with the packaged ``demo.toml``, its endpoint and port
swapped for those ports in memory, the shipped models found through the package, and a data
folder of its own. Nothing is read from a source checkout, so the demo runs from any install.
The effective config is saved beside the twin so ``edge-agent twin show --config
DATA_DIR/agent.toml`` works after the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from edge_agent import config as config_mod
from edge_agent.agent import Agent
from edge_agent.errors import ConfigError


def demo_text() -> str:
    """The packaged demo.toml, as shipped (comments kept)."""
    try:
        return resources.files("edge_agent.demo").joinpath("demo.toml").read_text("utf-8")
    except (OSError, ModuleNotFoundError) as exc:
        raise ConfigError([f"edge_agent/demo/demo.toml: cannot read the packaged demo config: {exc}"]) from exc


def shipped_model(name: str) -> Path:
    """The path of a model shipped with the package (models/ of the source tree)."""
    try:
        path = Path(str(resources.files("edge_agent.demo.models").joinpath(name)))
    except ModuleNotFoundError as exc:
        raise ConfigError([f"{name}: the shipped models are not installed: {exc}"]) from exc
    if not path.is_file():
        raise ConfigError([f"{path}: the shipped model {name} is not installed"])
    return path


def demo_config(opcua_endpoint: str, modbus_port: int, data_dir: Path,
                web_port: int | None = None) -> tuple[config_mod.AgentConfig, str]:
    """The packaged demo.toml with the plant's live ports, the shipped models and ``data_dir``, validated.

    The web page is served on ``web_port``; without one it is turned off (the tests that run the demo's
    config need no page). Returns the config and its text (comments kept), which the demo saves beside
    the twin.
    """
    text = demo_text()
    text = re.sub(r'(?m)^(endpoint\s*=\s*)"opc\.tcp://[^"]*"', lambda m: f'{m.group(1)}"{opcua_endpoint}"', text)
    text = re.sub(r"(?m)^(port\s*=\s*)\d+", lambda m: f"{m.group(1)}{modbus_port}", text)
    # the [web] section's port line (the line above set it to the Modbus port with the others)
    web = r"(?ms)^(\[web\]\n(?:[^\[\n][^\n]*\n|\n)*?{key}\s*=\s*)\S+"
    if web_port is None:
        text = re.sub(web.format(key="enabled"), lambda m: f"{m.group(1)}false", text)
    else:
        text = re.sub(web.format(key="port"), lambda m: f"{m.group(1)}{web_port}", text)
    text = re.sub(r'(?m)^(data_dir\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"."', text)
    # model files: the ones installed with the package, wherever that is
    text = re.sub(r'(?m)^(file\s*=\s*)"([^"]*)"',
                  lambda m: f'{m.group(1)}{_toml_string(str(shipped_model(Path(m.group(2)).name)))}', text)
    return config_mod.loads(text, data_dir / "agent.toml"), text


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


DEMO_SPEED = 5.0  # simulated seconds per real second: a minute of demo is five minutes of plant
FAULT_AT = 0.7  # the bearing fault starts at this fraction of the demo's duration
OVERRIDE_AT = 0.35  # an operator lowers the chiller setpoint on its panel at this fraction ...
ACK_AT = 0.5  # ... and acknowledges the override event here, so the optimiser may write it again


@dataclass
class Timeline:
    """What happened when, for the live view and the summary (seconds since the demo started)."""

    started: float = field(default_factory=time.time)
    fault_at: float | None = None
    override_at: float | None = None
    acked_at: float | None = None

    def now(self) -> float:
        return time.time() - self.started


def _value(reading: Any) -> str:
    if reading is None or reading.value is None:
        return "-"
    return f"{reading.value:.3f}" if isinstance(reading.value, float) else str(reading.value)


def _render(agent: Agent, plant: Any, timeline: Timeline, out: TextIO, live: bool) -> None:
    devices = "  ".join(f"{r.device.name}={r.status.state}" for r in agent.runners.values())
    fault = f"  FAULT: bearing wear since t={timeline.fault_at:.0f}s" if timeline.fault_at is not None else ""
    held = "".join(f"  OVERRIDE: {hold.point}" for hold in agent.status().overrides)
    header = f"edge-agent demo  t={timeline.now():5.1f}s  devices: {devices}  stored={agent.stored} rows{fault}{held}"
    web = agent.config.web
    if web.enabled and live:  # the live view clears the screen; the plain log printed it once at start
        header += f"\nweb page: http://{web.host}:{web.port}/"
    if live:
        out.write("\x1b[H\x1b[2J")
    out.write(header + "\n")
    if not live:
        out.flush()
        return
    out.write(f"{'point':28} {'value':>12} {'unit':6} {'quality':9} {'age':>7}  device\n")
    for owner, point in agent.config.points():
        reading = agent.latest.get(point.name)
        age = f"{time.time() - reading.ts:5.1f}s" if reading else "-"
        out.write(f"{point.name:28} {_value(reading):>12} {point.unit:6} {reading.quality if reading else '-':9} "
                  f"{age:>7}  {owner.name}\n")
    for name, model in agent.models.items():
        m = model.status
        if model.cfg.kind != "anomaly":
            out.write(f"\nmodel {name}: {m.state} (simulation, used by the optimiser)")
            continue
        score = "-" if m.last_score is None else f"{m.last_score:.2f}"
        threshold = model.model.threshold if model.model else None
        state = "ANOMALY" if model.anomaly_active else ("not scoring: " + m.last_skip if m.last_skip else "normal")
        out.write(f"\nmodel {name}: score {score} (threshold {threshold if threshold is not None else '-'}), {state}")
    if agent.optimizer is not None:
        opt = agent.optimizer
        last = opt.last.action + ": " + ", ".join(f"{k} -> {v:.2f}" for k, v in opt.last.setpoints.items()) \
            if opt.last else (opt.last_skip or "waiting for its first step")
        out.write(f"\noptimiser ({opt.mode}): {last}")
    for hold in agent.status().overrides:
        event = f"ack event {hold.event}" if hold.event is not None else "ack its event"
        out.write(f"\nOVERRIDE {hold.point}: {hold.old:g} -> {hold.new:g} at the device; automatic writes paused "
                  f"for {max(0.0, hold.until - time.time()):.0f} s or until an operator acks ({event})")
    snap = plant.snapshot()
    saving = _saving(snap)
    out.write(f"\n\nplant meters (simulated {snap.get('elapsed_s', 0):.0f} s): "
              f"chiller {snap['chiller1.energy']:.2f} kWh vs baseline {snap['baseline.chiller1.energy']:.2f} kWh "
              f"({saving:+.1f} % with the pump)\n")
    out.flush()


def _saving(snap: dict[str, Any]) -> float:
    """Chiller + pump energy against the baseline plant (same load, setpoints untouched), in %."""
    used = snap["chiller1.energy"] + snap["pump1.energy"]
    baseline = snap["baseline.chiller1.energy"] + snap["baseline.pump1.energy"]
    return 100.0 * (used - baseline) / baseline if baseline > 0 else 0.0


async def _demo(duration: float, data_dir: Path, out: TextIO) -> int:
    from edge_agent.demo.plant import Plant, free_port

    plant = Plant(opcua_port=free_port(), modbus_port=free_port(), seed=7, speed=DEMO_SPEED)
    await plant.start()
    try:
        config, effective = demo_config(plant.opcua_endpoint, plant.modbus_port, data_dir, web_port=free_port())
        await asyncio.to_thread(_save, data_dir, effective)
        agent = Agent(config)
        await agent.start()
        if config.web.enabled:
            out.write(f"web page: http://{config.web.host}:{config.web.port}/ (open it in a browser on this machine)\n")
            out.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        timeline = Timeline()
        live = out.isatty()
        try:
            while timeline.now() < duration and not stop.is_set():
                if timeline.fault_at is None and timeline.now() >= FAULT_AT * duration:
                    plant.inject_fault("vibration")
                    timeline.fault_at = timeline.now()
                await _operator(agent, plant, timeline, duration)
                _render(agent, plant, timeline, out, live)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0 if live else 5.0):
                        await stop.wait()
        finally:
            await agent.stop()
        _summary(agent, config, timeline, plant.snapshot(), out)
    finally:
        await plant.stop()
    return 0


async def _operator(agent: Agent, plant: Any, timeline: Timeline, duration: float) -> None:
    """The plant's operator: lowers the chiller setpoint on its panel, later acknowledges the override."""
    if timeline.override_at is None and timeline.now() >= OVERRIDE_AT * duration:
        await plant.operator_setpoint(plant.model.chiller_setpoint - 0.5)
        timeline.override_at = timeline.now()
    elif timeline.override_at is not None and timeline.acked_at is None and timeline.now() >= ACK_AT * duration:
        for hold in agent.status().overrides:
            if hold.event is not None:
                agent.event_acked(hold.event, "demo-operator")
        timeline.acked_at = timeline.now()


def _save(data_dir: Path, effective: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "agent.toml").write_text(effective)


def _summary(agent: Agent, config: config_mod.AgentConfig, timeline: Timeline, snap: dict[str, Any],
             out: TextIO) -> None:
    from edge_agent.store.views import TwinView

    with TwinView.open(config.twin_path) as twin:
        points = {p["name"]: p for p in twin.current()}
        history = twin.history_count()
        events = twin.events(0.0)
    device_points = [p.name for _, p in config.points()]
    good = sum(1 for name in device_points if points.get(name, {}).get("quality") == "good")
    out.write(f"\nsummary: ran {timeline.now():.0f} s; {good}/{len(device_points)} device points good; "
              f"{history} history rows in {config.twin_path}\n")
    for runner in agent.runners.values():
        s = runner.status
        traffic = f"{s.updates} readings by subscription" if runner.subscribe else f"{s.reads} polls"
        out.write(f"  device {s.name} ({s.protocol}): {s.state}, {traffic}, {s.read_errors} errors\n")
    _anomaly_summary(events, timeline, out)
    _override_summary(events, timeline, out)
    _optimiser_summary(agent, config, snap, timeline, out)
    out.write(f"inspect it:  edge-agent twin show --config {config.source}\n"
              f"             edge-agent twin events --config {config.source}\n")
    out.flush()


def _optimiser_summary(agent: Agent, config: config_mod.AgentConfig, snap: dict[str, Any], timeline: Timeline,
                       out: TextIO) -> None:
    from edge_agent.store.views import TwinView

    if config.optimizer is None:
        return
    with TwinView.open(config.twin_path) as twin:
        writes = twin.writes(timeline.started)
        hottest = max((r["value"] for r in twin.history("chiller1.supply_temp", timeline.started)
                       if isinstance(r["value"], float)), default=None)
    limit = next((c.max for c in config.optimizer.constraints if c.name == "chiller1.supply_temp"), None)
    minutes = snap["elapsed_s"] / 60
    out.write(f"  optimiser ({agent.optimizer.mode if agent.optimizer else '-'} at the end): energy "
              f"{_saving(snap):+.1f} % against the plant's own baseline over {minutes:.0f} simulated minutes "
              f"(chiller {snap['chiller1.energy']:.2f} vs {snap['baseline.chiller1.energy']:.2f} kWh, measured by the "
              f"plant's meters)\n")
    if hottest is not None and limit is not None:
        verdict = "held" if hottest <= limit else "EXCEEDED"
        out.write(f"  supply temperature limit {limit:g} degC {verdict} (highest reading {hottest:.2f} degC)\n")
    by_result: dict[str, int] = {}
    for w in writes:
        by_result[w["result"]] = by_result.get(w["result"], 0) + 1
    out.write(f"  writes through the safety gate: {len(writes)} "
              f"({', '.join(f'{n} {r}' for r, n in sorted(by_result.items())) or 'none'})\n")
    for w in [w for w in writes if w["result"] != "applied"][:5]:
        out.write(f"    {w['result']}: {w['point']} -> {w['requested']}: {w['reason']}\n")


def _override_summary(events: list[dict[str, Any]], timeline: Timeline, out: TextIO) -> None:
    overrides = [e for e in events if e["kind"] == "override"]
    for e in overrides:
        detail, at = e["detail"], e["ts"] - timeline.started
        if e["state"] == "raised":
            out.write(f"  operator override at t={at:.0f}s: {detail.get('point')} {detail.get('old'):g} -> "
                      f"{detail.get('new'):g} on the device's panel; the gate held automatic writes to it\n")
        else:
            out.write(f"  override cleared at t={at:.0f}s: {e['message']}\n")
    if not overrides and timeline.override_at is not None:
        out.write("  operator override: made, not noticed yet (the demo ended first)\n")


def _anomaly_summary(events: list[dict[str, Any]], timeline: Timeline, out: TextIO) -> None:
    raised = [e for e in events if e["kind"] == "anomaly" and e["state"] == "raised"]
    fault = timeline.fault_at
    if fault is None:
        out.write("  anomaly: no fault injected (the demo ended before it was due)\n")
        return
    before = [e for e in raised if e["ts"] - timeline.started < fault]
    after = [e for e in raised if e["ts"] - timeline.started >= fault]
    out.write(f"  fault: bearing wear injected at t={fault:.0f}s\n")
    if after:
        first = after[0]
        out.write(f"  anomaly: raised by {first['source']} at t={first['ts'] - timeline.started:.0f}s, "
                  f"{first['ts'] - timeline.started - fault:.0f} s after the fault (score {first['score']:.2f}); "
                  f"{len(before)} before the fault\n")
    else:
        out.write(f"  anomaly: not raised yet ({len(before)} before the fault); run longer, e.g. --duration 90\n")


def run_demo(duration: float = 60.0, data_dir: str | None = None, out: TextIO = sys.stdout) -> int:
    """Run the demo for ``duration`` seconds; returns the exit status."""
    folder = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    return asyncio.run(_demo(duration, folder.resolve(), out))
