"""Health: what the running agent tells about itself, locally, without MQTT.

Every few seconds the agent writes ``data_dir/status.json`` (atomically: a temp file renamed
over the old one). ``edge-agent status`` reads it: the process id says whether the agent is
still running, and the file's own timestamp whether it is still making progress.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.errors import TwinError

if TYPE_CHECKING:
    from edge_agent.agent import Agent

STATUS_FILE = "status.json"


def snapshot(agent: Agent) -> dict[str, Any]:
    """Everything `edge-agent status` shows, as plain JSON-able data."""
    now = time.time()
    devices = []
    for runner in agent.runners.values():
        s = runner.status
        devices.append({"name": s.name, "protocol": s.protocol, "state": s.state, "since": s.since,
                        "last_ok": s.last_ok or None, "last_error": s.last_error, "reads": s.reads,
                        "updates": s.updates, "read_errors": s.read_errors})
    models = []
    for name, model in agent.models.items():
        m = model.status
        models.append({"name": name, "kind": model.cfg.kind, "state": m.state, "last_score": m.last_score,
                       "last_ts": m.last_ts, "evaluations": m.evaluations, "skips": sum(m.skips.values()),
                       "last_skip": m.last_skip, "anomaly": model.anomaly_active, "last_error": m.last_error,
                       "source": model.model.source if model.model else None})
    return {
        "v": 1, "version": __version__, "pid": os.getpid(), "ts": now, "started": agent.started,
        "uptime_s": now - agent.started, "gateway": agent.config.agent.id, "site": agent.config.agent.site,
        "config": str(agent.config.source), "devices": devices, "models": models,
        "twin": {"stored": agent.stored, "flushes": agent.flushes, "flush_errors": agent.flush_errors,
                 "pending": agent.pending_count},
        "mqtt": _mqtt(agent),
        "errors": list(agent.recent_errors),
    }


def _mqtt(agent: Agent) -> dict[str, Any] | None:
    if agent.sync is None or agent.outbox is None:
        return None
    link = agent.sync.link
    try:
        stats = agent.outbox.stats()
    except TwinError as exc:
        return {"connected": link.connected.is_set(), "last_error": link.last_error, "outbox_error": str(exc)}
    return {"broker": f"{link.cfg.host}:{link.cfg.port}", "connected": link.connected.is_set(),
            "last_error": link.last_error, "published": agent.sync.published, "acked": agent.sync.acked,
            "outbox_depth": stats.depth, "outbox_bytes": stats.bytes, "outbox_oldest_age_s": stats.oldest_age_s,
            "dropped_messages": stats.dropped_messages, "dropped_samples": stats.dropped_samples}


def write(path: Path, status: dict[str, Any]) -> None:
    """Replace the status file atomically (readers never see half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=1, default=str))
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any] | None:
    """The last status the agent wrote, or None when there is none."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def running(status: dict[str, Any]) -> bool:
    """Whether the process that wrote the status still exists."""
    pid = status.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user (the service account)
        return True
    return True


def summary(agent: Agent) -> str:
    """One line for systemd's STATUS=: devices up, outbox depth, anomalies."""
    up = sum(1 for r in agent.runners.values() if r.status.state == "up")
    text = f"{up}/{len(agent.runners)} devices up"
    down = [r.device.name for r in agent.runners.values() if r.status.state != "up"]
    if down:
        text += f" (down: {', '.join(down[:3])}{'...' if len(down) > 3 else ''})"
    if agent.sync is not None:
        text += f"; mqtt {'connected' if agent.sync.link.connected.is_set() else 'offline'}"
    active = [name for name, runner in agent.models.items() if runner.anomaly_active]
    if active:
        text += f"; anomaly: {', '.join(active)}"
    return text
