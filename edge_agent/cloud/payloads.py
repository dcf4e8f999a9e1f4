"""MQTT topics and JSON payloads (version 1). JSON Schemas for each are in docs/schemas/.

Under ``{topic_prefix}/{site}/{gateway_id}/``:

- ``state``      retained ``{"v":1,"gateway","state":"online"|"offline","ts"}``; "offline" is the Will.
- ``telemetry``  ``{"v":1,"gateway","seq","points":[{"name","ts","value","quality"}...]}``, plus
                 ``"gap":{"from_seq","to_seq","messages","samples"}`` when the outbox had to drop.
- ``twin``       retained ``{"v":1,"gateway","ts","points":[{"name","value","quality","ts","unit"}...]}``;
                 a point with a desired state also has ``"desired":{"value","version","source","status","reason"}``.
- ``events``     ``{"v":1,"gateway","seq","ts","type",...}``, one event per message.
- ``cmd`` and ``cmd/response`` belong to remote management; ``desired`` (retained, from the cloud)
  to desired state (:mod:`edge_agent.remote.desired`).

Telemetry is the hot path (every sample goes through it), so its JSON is written by hand with
point names encoded once; everything else uses :func:`json.dumps`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.base import Reading
from edge_agent.store.messages import Stamp, json_safe

VERSION = 1


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one gateway."""

    base: str

    @classmethod
    def of(cls, prefix: str, site: str, gateway: str) -> Topics:
        return cls(f"{prefix}/{site}/{gateway}")

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def twin(self) -> str:
        return f"{self.base}/twin"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def cmd(self) -> str:
        return f"{self.base}/cmd"

    @property
    def cmd_response(self) -> str:
        return f"{self.base}/cmd/response"

    @property
    def desired(self) -> str:
        return f"{self.base}/desired"


def _value(value: Any) -> str:
    """One JSON value; NaN and infinities (not JSON) become null."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "null"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


class TelemetryEncoder:
    """Builds telemetry payloads; caches each point's encoded name."""

    def __init__(self, gateway: str) -> None:
        self._head = f'{{"v":{VERSION},"gateway":{json.dumps(gateway, ensure_ascii=False)},"seq":'
        self._names: dict[str, str] = {}

    def _name(self, name: str) -> str:
        encoded = self._names.get(name)
        if encoded is None:
            encoded = self._names[name] = '{"name":' + json.dumps(name, ensure_ascii=False) + ',"ts":'
        return encoded

    def encode(self, samples: Sequence[Reading], stamp: Stamp) -> bytes:
        """The payload for one telemetry message carrying ``samples``."""
        name, value = self._name, _value
        stamps: dict[float, str] = {}  # the readings of one device read share their timestamp
        parts = []
        for r in samples:
            ts = stamps.get(r[3])
            if ts is None:
                ts = stamps[r[3]] = repr(r[3])
            v = r[1]
            # the common case inline: a finite float (v - v is nan for nan and inf)
            shown = repr(v) if v.__class__ is float and v - v == 0.0 else value(v)
            parts.append(f'{name(r[0])}{ts},"value":{shown},"quality":"{r[2]}"}}')
        gap = "" if stamp.gap is None else ',"gap":' + json.dumps(stamp.gap.record()["gap"])
        return f'{self._head}{stamp.seq}{gap},"points":[{",".join(parts)}]}}'.encode()


def state(gateway: str, value: str) -> bytes:
    """The retained ``state`` payload: "online" or "offline"."""
    return json.dumps({"v": VERSION, "gateway": gateway, "state": value, "ts": time.time()}).encode()


def twin_snapshot(gateway: str, points: Iterable[Mapping[str, Any]]) -> bytes:
    """The retained ``twin`` payload: every point's current value and quality, and its desired state
    when it has one (a ``desired`` mapping of value, version, source, status and reason)."""
    body = {"v": VERSION, "gateway": gateway, "ts": time.time(), "points": [_twin_point(p) for p in points]}
    return json.dumps(body, ensure_ascii=False).encode()


def _twin_point(p: Mapping[str, Any]) -> dict[str, Any]:
    point = {"name": p["name"], "value": _finite(p["value"]), "quality": p["quality"], "ts": p["ts"], "unit": p["unit"]}
    desired = p.get("desired")
    if desired is not None:
        point["desired"] = {"value": _finite(desired["value"]), "version": desired["version"],
                            "source": desired["source"], "status": desired["status"], "reason": desired["reason"]}
    return point


def event(gateway: str, stamp: Stamp, kind: str, fields: Mapping[str, Any]) -> bytes:
    """One ``events`` payload; with ``"gap":{"from_seq","to_seq","messages"}`` when the outbox dropped
    events since the last one (events and responses filled their share of it)."""
    body = {"v": VERSION, "gateway": gateway, "seq": stamp.seq, "ts": time.time(), "type": kind, **fields}
    if stamp.gap is not None:
        body.update(stamp.gap.event_record())
    return json.dumps(json_safe(body), ensure_ascii=False, default=str, allow_nan=False).encode()


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
