"""MQTT topics and JSON payloads (version 1; telemetry also version 2). JSON Schemas are in docs/schemas/.

Under ``{topic_prefix}/{site}/{gateway_id}/``:

- ``state``      retained ``{"v":1,"gateway","state":"online"|"offline","ts"}``; "offline" is the Will.
- ``telemetry``  ``{"v":1,"gateway","seq","points":[{"name","ts","value","quality"}...]}``, plus
                 ``"gap":{"from_seq","to_seq","messages","samples"}`` when the outbox had to drop.
                 With ``mqtt.telemetry_version = 2`` instead the compact
                 ``{"v":2,"gateway","seq","reads":[{"ts","names":[...],"values":[...],"quality"}...]}``:
                 one entry per run of samples sharing a ts (a device read), ``quality`` one string when
                 the run agrees, else an array parallel to ``values``; the same optional ``gap``.
- ``twin``       retained ``{"v":1,"gateway","ts","points":[{"name","value","quality","ts","unit"}...]}``;
                 a point with a desired state also has ``"desired":{"value","version","source","status","reason"}``.
- ``events``     ``{"v":1,"gateway","seq","ts","type",...}``, one event per message.
- ``cmd`` and ``cmd/response`` belong to remote management; ``desired`` (retained, from the cloud)
  to desired state (:mod:`edge_agent.remote.desired`).

Telemetry is the hot path (every sample goes through it), so its JSON is written by hand with
point names encoded once and values encoded in bulk by the C encoder; everything else uses
:func:`json.dumps`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from drivers.base import Batch, DeviceRead, Reading
from edge_agent.store import floats
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
        return floats.one(float(value)) if math.isfinite(value) else "null"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


# The C encoder, set up once: compact, non-ASCII kept, and NaN/infinity refused (the caller then
# replaces them by null). json.dumps with these options would build a new encoder on every call.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
# Value types the C encoder writes exactly as _value does (subclasses may repr differently).
_PLAIN = frozenset({float, int, bool, type(None)})


def _finite_values(values: Sequence[Any]) -> list[Any]:
    """``values`` with NaN and infinities replaced by None (the slow path, taken only when there are some)."""
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def _plain_texts(values: Sequence[Any]) -> list[str] | None:
    """Each value's JSON text, all encoded in one C call; None when a value is not a plain number,
    boolean or None (a string may hold commas), or is NaN or infinite."""
    if not _PLAIN.issuperset(map(type, values)):
        return None
    texts = floats.make(values)  # every value a float, the common case: the twin's digits, made in Rust
    if texts is not None:
        return texts
    try:
        return _JSON.encode(values)[1:-1].split(",")
    except ValueError:  # NaN or infinity
        return None


def _runs(stamps: Sequence[float]) -> Iterator[tuple[float, int]]:
    """(ts, length) of each run of consecutive equal timestamps (one device read shares one ts)."""
    for ts, group in groupby(stamps):
        yield ts, len(list(group))


def _lookup(cache: dict[str, str], keys: Sequence[str], make: Callable[[str], str]) -> list[str]:
    """``cache[k]`` for every key, looked up in C; ``make`` fills the cache on the first miss."""
    try:
        return list(map(cache.__getitem__, keys))
    except KeyError:
        for key in set(keys):
            make(key)
        return list(map(cache.__getitem__, keys))


class TelemetryEncoder:
    """Builds version 1 telemetry payloads (one object per sample); caches each point's encoded name.

    The common message (device reads of many samples sharing a ts, every value a plain number,
    boolean or None) is built column-wise: all its values go through the C JSON encoder in one call
    and are split at the commas, and the pieces of each sample are joined in C. Anything else
    (strings, NaN, subclasses, a ts per sample) takes the per-sample path; both write the same bytes.
    """

    def __init__(self, gateway: str) -> None:
        self._head = f'{{"v":{VERSION},"gateway":{json.dumps(gateway, ensure_ascii=False)},"seq":'
        self._names: dict[str, str] = {}
        self._qualities: dict[str, str] = {}

    def _name(self, name: str) -> str:
        encoded = self._names.get(name)
        if encoded is None:
            encoded = self._names[name] = '{"name":' + json.dumps(name, ensure_ascii=False) + ',"ts":'
        return encoded

    def _quality(self, quality: str) -> str:
        encoded = self._qualities.get(quality)
        if encoded is None:
            encoded = self._qualities[quality] = f',"quality":"{quality}"}}'
        return encoded

    def encode(self, samples: Sequence[Reading], stamp: Stamp) -> bytes:
        """The payload for one telemetry message carrying ``samples``."""
        points = (self._columns(samples) if samples else None) or self._rows(samples)
        gap = "" if stamp.gap is None else ',"gap":' + json.dumps(stamp.gap.record()["gap"])
        return f'{self._head}{stamp.seq}{gap},"points":[{points}]}}'.encode()

    def _columns(self, samples: Sequence[Reading]) -> str | None:
        """The points, column-wise; None when a value needs the per-sample path."""
        names, values, qualities, stamps = zip(*samples, strict=True)
        # like _rows, an equal ts keeps the text of its first occurrence (dict.fromkeys keeps the first key)
        distinct = dict.fromkeys(stamps)
        if len(distinct) * 4 > len(samples):  # mostly a ts per sample (measured: the per-sample path is cheaper)
            return None
        shown = _plain_texts(values)
        if shown is None:
            return None
        prefixes = _lookup(self._names, names, self._name)
        times = list(map(dict(zip(distinct, map('{!r},"value":'.format, distinct), strict=True)).__getitem__, stamps))
        suffixes = _lookup(self._qualities, qualities, self._quality)
        return ",".join(map("".join, zip(prefixes, times, shown, suffixes, strict=True)))

    def _rows(self, samples: Sequence[Reading]) -> str:
        name, value, one = self._name, _value, floats.one
        stamps: dict[float, str] = {}  # the readings of one device read share their timestamp
        parts = []
        for r in samples:
            ts = stamps.get(r[3])
            if ts is None:
                ts = stamps[r[3]] = repr(r[3])
            v = r[1]
            # the common case inline: a finite float (v - v is nan for nan and inf)
            shown = one(v) if v.__class__ is float and v - v == 0.0 else value(v)
            parts.append(f'{name(r[0])}{ts},"value":{shown},"quality":"{r[2]}"}}')
        return ",".join(parts)


class CompactTelemetryEncoder:
    """Builds version 2 telemetry payloads: one entry per run of samples sharing a timestamp.

    ``{"v":2,"gateway","seq","reads":[{"ts","names":[...],"values":[...],"quality"}...]}``. A device
    read gives a run of samples with one ts and, read after read, the same names: the encoded
    ``names`` array is cached per tuple of names (at most ``names_cache`` of them, the oldest
    forgotten first). A run of finite floats takes the texts the twin made for its history block
    (:mod:`edge_agent.store.floats`), or makes them in one orjson call; any other run goes through
    the C JSON encoder in one call. So the Python work is per run, not per sample.
    """

    def __init__(self, gateway: str, names_cache: int = 1024) -> None:
        self._head = f'{{"v":2,"gateway":{json.dumps(gateway, ensure_ascii=False)},"seq":'
        self._names: dict[tuple[str, ...], str] = {}
        self._limit = names_cache
        self._strings: dict[str, str] = {}  # a name or quality -> its JSON string (bounded by the config)

    def _string(self, text: str) -> str:
        encoded = self._strings[text] = json.dumps(text, ensure_ascii=False)
        return encoded

    def _array(self, texts: Sequence[str]) -> str:
        """A JSON array of strings, each encoded once for the encoder's lifetime."""
        return "[" + ",".join(_lookup(self._strings, texts, self._string)) + "]"

    def _names_text(self, names: tuple[str, ...]) -> str:
        text = self._names.get(names)
        if text is None:
            if len(self._names) >= self._limit:
                del self._names[next(iter(self._names))]
            text = self._names[names] = ',"names":' + self._array(names) + ',"values":'
        return text

    def _quality(self, qualities: tuple[str, ...]) -> str:
        """``"quality":Q``: one string when the run agrees, else an array parallel to the values."""
        first = qualities[0]
        if qualities.count(first) != len(qualities):
            return ',"quality":' + self._array(qualities) + "}"
        return ',"quality":' + (self._strings.get(first) or self._string(first)) + "}"

    def encode(self, samples: Sequence[Reading], stamp: Stamp) -> bytes:
        """The payload for one telemetry message carrying ``samples``."""
        entries = self.entries(samples, len(samples)) if samples else []
        return self.encode_entries([text for text, _ in entries], stamp)

    def encode_entries(self, entries: Sequence[str], stamp: Stamp) -> bytes:
        """The payload for one telemetry message of ``reads`` entries made by :meth:`entries`."""
        gap = "" if stamp.gap is None else ',"gap":' + json.dumps(stamp.gap.record()["gap"])
        return f'{self._head}{stamp.seq}{gap},"reads":[{",".join(entries)}]}}'.encode()

    def entries(self, samples: Sequence[Reading], limit: int) -> list[tuple[str, int]]:
        """The encoded ``reads`` entries of ``samples``, each with its number of samples; a run of more
        than ``limit`` samples is split into entries of at most ``limit``.

        The cloud sync makes them right after the twin stored the samples (in the twin writer's
        worker thread), and keeps only these texts until the next publish: about 30 bytes a
        sample instead of the readings (about 160 bytes with their float texts). What the twin
        stored comes as a :class:`~drivers.base.Batch`: a whole device read (a DeviceRead) is
        one entry made from its columns (its values by one orjson call)."""
        entries: list[tuple[str, int]] = []
        for read in samples.reads if isinstance(samples, Batch) else (samples,):
            if isinstance(read, DeviceRead) and 0 < len(read) <= limit:
                shown = floats.array(read.values) or self._values(read.values)
                entries.append((f'{{"ts":{read.ts!r}{self._names_text(read.names)}{shown}'
                                f'{self._quality((read.quality,))}', len(read)))
            elif read:
                entries += self._run_entries(read, limit)
        return entries

    def _run_entries(self, samples: Sequence[Reading], limit: int) -> list[tuple[str, int]]:
        """The entries of readings in runs of one timestamp (see :meth:`entries`)."""
        names, values, qualities, stamps = zip(*samples, strict=True)
        entries = []
        start = 0
        for ts, length in _runs(stamps):
            for first in range(start, start + length, limit):
                end = min(first + limit, start + length)
                run = values[first:end]
                # a device read's floats: their texts were made for the twin's history a moment ago
                texts = floats.take(run)
                shown = "[" + ",".join(texts) + "]" if texts is not None else self._values(run)
                entries.append((f'{{"ts":{ts!r}{self._names_text(names[first:end])}{shown}'
                                f'{self._quality(qualities[first:end])}', end - first))
            start += length
        return entries

    @staticmethod
    def _values(run: Sequence[Any]) -> str:
        """One run's values array when the message has strings, NaN or infinities (null, as in v1)."""
        try:
            return _JSON.encode(run)
        except ValueError:
            return _JSON.encode(_finite_values(run))


def telemetry_encoder(gateway: str, version: int) -> TelemetryEncoder | CompactTelemetryEncoder:
    """The encoder for ``mqtt.telemetry_version`` (1: an object per sample; 2: runs per device read)."""
    return CompactTelemetryEncoder(gateway) if version == 2 else TelemetryEncoder(gateway)


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
