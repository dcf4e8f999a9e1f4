"""What the running agent tells about itself: one frozen snapshot, read by every part that reports.

:class:`GatewayStatus` is taken by :meth:`edge_agent.agent.Agent.status` and is the only thing
the reporters see: ``data_dir/status.json`` (for ``edge-agent status``), the Prometheus
endpoint (:mod:`edge_agent.service.metrics`), systemd's ``STATUS=`` line
(:mod:`edge_agent.service.notify`), the remote ``status`` command and its config health check.
None of them holds the agent.

Every few seconds the agent writes ``data_dir/status.json`` atomically (a temp file renamed over
the old one). ``edge-agent status`` reads it: the process id says whether the agent is still
running, and the file's own timestamp whether it is still making progress.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__

if TYPE_CHECKING:
    from edge_agent.device import DeviceStatus
    from edge_agent.store.messages import OutboxStats
    from edge_agent.store.writer import TwinState

STATUS_FILE = "status.json"


@dataclass(frozen=True, slots=True)
class ModelState:
    """One model, as the reporters show it."""

    name: str
    kind: str
    state: str  # loading | ready | failed
    last_score: float | None
    last_ts: float | None
    evaluations: int
    skips: int
    last_skip: str
    anomaly: bool
    last_error: str
    source: str | None
    cpu_us: float


@dataclass(frozen=True, slots=True)
class LinkState:
    """The MQTT link and the outbox behind it."""

    broker: str
    connected: bool
    last_error: str
    published: int
    acked: int
    outbox: OutboxStats | None  # None when its stats could not be read (see outbox_error)
    outbox_error: str = ""


@dataclass(frozen=True, slots=True)
class OverrideState:
    """A writable point an operator changed at the device: automatic writes to it are paused."""

    point: str
    since: float
    until: float
    event: int | None  # the override event to acknowledge (None until the twin stored it)
    old: float | None
    new: float | None


@dataclass(frozen=True, slots=True)
class GatewayStatus:
    """The agent at one instant. ``devices`` hold copies of the supervisors' status records."""

    ts: float
    started: float
    gateway: str
    site: str
    config: Path
    devices: tuple[DeviceStatus, ...]
    models: tuple[ModelState, ...]
    twin: TwinState
    mqtt: LinkState | None
    optimizer_mode: str | None
    dead_parts: tuple[str, ...]  # "device:NAME task died: <exception>" for every part whose task died
    errors: tuple[str, ...]  # the last warnings and errors logged
    overrides: tuple[OverrideState, ...] = ()  # operator overrides holding automatic writes
    sparkplug: LinkState | None = None  # the Sparkplug B edge node's connection and outbox, when enabled
    storage: tuple[str, ...] = ()  # database files set aside, or run in memory, at start

    @property
    def devices_up(self) -> frozenset[str]:
        return frozenset(d.name for d in self.devices if d.state == "up")

    @property
    def models_ready(self) -> frozenset[str]:
        return frozenset(m.name for m in self.models if m.state == "ready")

    @property
    def mqtt_connected(self) -> bool:
        return self.mqtt is not None and self.mqtt.connected

    def device(self, name: str) -> DeviceStatus | None:
        return next((d for d in self.devices if d.name == name), None)

    def model(self, name: str) -> ModelState | None:
        return next((m for m in self.models if m.name == name), None)

    def summary(self) -> str:
        """One line for systemd's STATUS=: devices up, the MQTT link, active anomalies."""
        text = f"{len(self.devices_up)}/{len(self.devices)} devices up"
        down = [d.name for d in self.devices if d.state != "up"]
        if down:
            text += f" (down: {', '.join(down[:3])}{'...' if len(down) > 3 else ''})"
        if self.mqtt is not None:
            text += f"; mqtt {'connected' if self.mqtt.connected else 'offline'}"
        active = [m.name for m in self.models if m.anomaly]
        if active:
            text += f"; anomaly: {', '.join(active)}"
        if self.overrides:
            text += f"; override: {', '.join(o.point for o in self.overrides)}"
        if self.twin.failing_since is not None:
            text += "; twin NOT writing"
        if self.storage:
            text += f"; {len(self.storage)} database file(s) set aside"
        return text

    def to_json(self) -> dict[str, Any]:
        """``status.json`` (version 1): everything ``edge-agent status`` shows, as plain data."""
        return {
            "v": 1, "version": __version__, "pid": os.getpid(), "ts": self.ts, "started": self.started,
            "uptime_s": self.ts - self.started, "gateway": self.gateway, "site": self.site,
            "config": str(self.config),
            "devices": [{"name": d.name, "protocol": d.protocol, "state": d.state, "since": d.since,
                         "last_ok": d.last_ok or None, "last_error": d.last_error, "reads": d.reads,
                         "updates": d.updates, "read_errors": d.read_errors} for d in self.devices],
            "models": [{"name": m.name, "kind": m.kind, "state": m.state, "last_score": m.last_score,
                        "last_ts": m.last_ts, "evaluations": m.evaluations, "skips": m.skips,
                        "last_skip": m.last_skip, "anomaly": m.anomaly, "last_error": m.last_error,
                        "source": m.source} for m in self.models],
            "twin": {"stored": self.twin.stored, "flushes": self.twin.flushes, "flush_errors": self.twin.flush_errors,
                     "pending": self.twin.pending, "writing": self.twin.failing_since is None,
                     "failing_since": self.twin.failing_since, "last_error": self.twin.last_error,
                     "dropped": self.twin.dropped, "dropped_records": self.twin.dropped_records},
            "mqtt": _mqtt(self.mqtt),
            "sparkplug": _mqtt(self.sparkplug),
            "errors": list(self.errors),
            "overrides": [{"point": o.point, "since": o.since, "until": o.until, "event": o.event, "old": o.old,
                           "new": o.new} for o in self.overrides],
            "storage": list(self.storage),
        }


def _mqtt(link: LinkState | None) -> dict[str, Any] | None:
    if link is None:
        return None
    if link.outbox is None:
        return {"connected": link.connected, "last_error": link.last_error, "outbox_error": link.outbox_error}
    stats = link.outbox
    return {"broker": link.broker, "connected": link.connected, "last_error": link.last_error,
            "published": link.published, "acked": link.acked, "outbox_depth": stats.depth,
            "outbox_bytes": stats.bytes, "outbox_oldest_age_s": stats.oldest_age_s,
            "dropped_messages": stats.dropped_messages, "dropped_samples": stats.dropped_samples,
            "dropped_events": stats.dropped_events, "dropped_responses": stats.dropped_responses}


def write(path: Path, status: Mapping[str, Any]) -> None:
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


def running(status: Mapping[str, Any]) -> bool:
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
