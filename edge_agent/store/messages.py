"""What goes through the outbox: drafts in, stored messages out, the seqs and gaps that prove completeness.

See :mod:`edge_agent.store.outbox` for how they are stored, handed out, acknowledged and dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

Kind = Literal["telemetry", "event", "state", "twin", "response"]
KINDS: frozenset[str] = frozenset(get_args(Kind))
SNAPSHOT_KINDS: frozenset[str] = frozenset({"state", "twin"})  # a newer one replaces the pending older one
EVENT_KINDS: frozenset[str] = frozenset({"event", "response"})  # kept within OutboxLimits.event_share


def json_safe(value: Any) -> Any:
    """``value`` with every NaN and infinity (not JSON) replaced by None, in nested dicts and lists too.

    Payloads are then dumped with ``allow_nan=False``: what a broker's subscriber parses is JSON.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds on what the outbox holds; past them the oldest telemetry is dropped.

    ``max_rows`` counts messages of every kind, ``max_bytes`` their payload bytes (the file is
    somewhat larger: SQLite pages, indexes, the WAL). Events and command responses together
    take at most ``event_share`` of both; past that the oldest of them are dropped, so they can
    never crowd telemetry out. A small outbox still keeps ``event_min_rows`` and ``event_min_bytes``
    for them (at most half of it).
    """

    max_rows: int = 1_000_000
    max_bytes: int = 256 * 1024 * 1024
    event_share: float = 0.1
    event_min_rows: int = 10
    event_min_bytes: int = 64 * 1024

    @property
    def event_rows(self) -> int:
        return max(1, int(self.max_rows * self.event_share), min(self.event_min_rows, self.max_rows // 2))

    @property
    def event_bytes(self) -> int:
        return max(1, int(self.max_bytes * self.event_share), min(self.event_min_bytes, self.max_bytes // 2))


@dataclass(frozen=True, slots=True)
class Gap:
    """Telemetry dropped and not yet reported: seq range, how many messages and samples."""

    from_seq: int
    to_seq: int
    messages: int
    samples: int

    def record(self) -> dict[str, dict[str, int]]:
        """The gap record a telemetry payload carries: ``{"gap": {...}}``."""
        return {"gap": {"from_seq": self.from_seq, "to_seq": self.to_seq,
                        "messages": self.messages, "samples": self.samples}}

    def event_record(self) -> dict[str, dict[str, int]]:
        """The gap record an ``events`` payload carries (events have no samples)."""
        return {"gap": {"from_seq": self.from_seq, "to_seq": self.to_seq, "messages": self.messages}}

    def merge(self, other: Gap | None) -> Gap:
        if other is None:
            return self
        return Gap(min(self.from_seq, other.from_seq), max(self.to_seq, other.to_seq),
                   self.messages + other.messages, self.samples + other.samples)


@dataclass(frozen=True, slots=True)
class Stamp:
    """What the outbox tells a payload builder: the message's seq and, for telemetry, the gap to report."""

    seq: int | None
    gap: Gap | None = None


Build = Callable[[Stamp], bytes]


@dataclass(frozen=True, slots=True)
class Draft:
    """A message to append. ``payload`` is bytes, or a builder called with the message's Stamp.

    ``correlation`` is the MQTT 5 Correlation Data a command ``response`` echoes to its requester.
    """

    kind: Kind
    topic: str
    payload: bytes | Build
    samples: int = 0
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"outbox message kind must be one of {sorted(KINDS)}, got {self.kind!r}")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {self.qos!r}")


@dataclass(frozen=True, slots=True)
class Appended:
    """The outcome of one Draft: its row id (None when refused because the outbox is full) and seq."""

    id: int | None
    seq: int | None


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message, as handed to the MQTT link."""

    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    seq: int | None
    samples: int
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Depth and health of the outbox, for ``edge-agent twin outbox`` and metrics."""

    depth: int
    bytes: int
    inflight: int
    oldest_age_s: float | None
    dropped_messages: int
    dropped_samples: int
    next_telemetry_seq: int
    next_event_seq: int
    pending_gap: Gap | None
    file_bytes: int
    dropped_events: int = 0  # events dropped because events and responses filled their share
    dropped_responses: int = 0
    pending_event_gap: Gap | None = None
