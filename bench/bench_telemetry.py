"""Telemetry encoding cost: version 1 (an object per sample) against version 2 (a run per device read).

    .venv/bin/python bench/bench_telemetry.py [--devices 10] [--points 100] [--max-samples 1000]
                                              [--rounds 200] [--values sensor|short]

The plant shape: ``--devices`` device reads of ``--points`` samples each, every read one source
timestamp, names like ``dev07.p042``, float values, quality "good"; the batch is split into
messages of ``--max-samples`` samples as the sync step splits a publish interval (default: the
config's default ``mqtt.max_samples``). ``--values sensor`` gives float32 readings widened to
Python floats (long reprs, 23.399999618530273, as a Modbus float32 point gives them); ``short``
gives one-decimal values (23.4). Reported per sample: CPU time of the encoders (process time, the
batch encoded ``--rounds`` times after a warm-up) and payload bytes. "v1 per-sample path" is the
v1 encoder's fallback for strings and NaN, which is also what every message cost before issue 13.
Before timing, the script checks that v1 and v2 carry the same samples and that the v1 paths
write the same bytes. Prints figures; asserts nothing else.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.base import Reading
from edge_agent.cloud import payloads
from edge_agent.config.schema import MqttSection
from edge_agent.store.messages import Stamp

Encode = Callable[[Sequence[Reading], Stamp], bytes]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10, help="device reads per batch (10)")
    parser.add_argument("--points", type=int, default=100, help="samples per device read, one ts each (100)")
    default_max = MqttSection.__dataclass_fields__["max_samples"].default
    parser.add_argument("--max-samples", type=int, default=default_max,
                        help=f"samples per message, as mqtt.max_samples ({default_max})")
    parser.add_argument("--rounds", type=int, default=200, help="times the batch is encoded per encoder (200)")
    parser.add_argument("--values", choices=("sensor", "short"), default="sensor",
                        help="sensor: float32 widened (long reprs); short: one decimal (sensor)")
    return parser.parse_args(argv)


def plant_batch(devices: int, points: int, values: str) -> list[Reading]:
    """One publish interval of the plant: a run of ``points`` samples per device, one ts per run."""
    base = time.time()
    raw = [20.0 + (i * 7.31) % 60.0 for i in range(devices * points)]
    if values == "sensor":
        raw = list(struct.unpack(f"{len(raw)}f", struct.pack(f"{len(raw)}f", *raw)))
    else:
        raw = [round(v, 1) for v in raw]
    return [Reading(f"dev{d:02d}.p{p:03d}", raw[d * points + p], "good", base + d * 0.0123)
            for d in range(devices) for p in range(points)]


def messages(batch: list[Reading], size: int) -> list[list[Reading]]:
    """The batch split as Sync._telemetry_drafts splits it."""
    return [batch[i:i + size] for i in range(0, len(batch), size)]


def cpu_per_sample(encode: Encode, chunks: list[list[Reading]], rounds: int) -> tuple[float, int]:
    """(CPU seconds per sample, payload bytes per batch) of encoding every chunk, ``rounds`` times."""
    size = sum(len(encode(chunk, Stamp(seq))) for seq, chunk in enumerate(chunks, 1))  # warm-up, caches filled
    began = time.process_time()
    for _ in range(rounds):
        for seq, chunk in enumerate(chunks, 1):
            encode(chunk, Stamp(seq))
    samples = sum(len(c) for c in chunks) * rounds
    return (time.process_time() - began) / samples, size


def samples_of(payload: bytes) -> list[tuple[str, float, object, str]]:
    """(name, ts, value, quality) of a v1 or v2 payload (the check below; tests/schemas.py has the full one)."""
    body = json.loads(payload)
    if body["v"] == 1:
        return [(p["name"], p["ts"], p["value"], p["quality"]) for p in body["points"]]
    return [(n, r["ts"], v, r["quality"] if isinstance(r["quality"], str) else r["quality"][i])
            for r in body["reads"] for i, (n, v) in enumerate(zip(r["names"], r["values"], strict=True))]


def check(chunks: list[list[Reading]], v1: payloads.TelemetryEncoder, v2: payloads.CompactTelemetryEncoder,
          rows: Encode) -> None:
    for seq, chunk in enumerate(chunks, 1):
        one, two = v1.encode(chunk, Stamp(seq)), v2.encode(chunk, Stamp(seq))
        if one != rows(chunk, Stamp(seq)):
            raise SystemExit(f"check failed: message {seq}: the v1 paths differ")
        if samples_of(one) != samples_of(two) or len(samples_of(two)) != len(chunk):
            raise SystemExit(f"check failed: message {seq}: v1 and v2 carry different samples")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    batch = plant_batch(args.devices, args.points, args.values)
    chunks = messages(batch, args.max_samples)
    v1, v2 = payloads.TelemetryEncoder("gw-01"), payloads.CompactTelemetryEncoder("gw-01")

    def rows(chunk: Sequence[Reading], stamp: Stamp) -> bytes:
        """The v1 encoder forced onto its per-sample path (the encoder before issue 13)."""
        text = v1._rows(chunk)
        gap = "" if stamp.gap is None else ',"gap":' + json.dumps(stamp.gap.record()["gap"])
        return f'{{"v":1,"gateway":"gw-01","seq":{stamp.seq}{gap},"points":[{text}]}}'.encode()

    check(chunks, v1, v2, rows)
    n = len(batch)
    print(f"{args.devices} reads x {args.points} samples ({args.values} floats), {len(chunks)} messages of at most "
          f"{args.max_samples} samples, {args.rounds} rounds; CPU and bytes per sample:")
    results = {label: cpu_per_sample(encode, chunks, args.rounds)
               for label, encode in (("v1 per-sample path", rows), ("v1", v1.encode), ("v2", v2.encode))}
    base = results["v1 per-sample path"][0]
    for label, (cpu, size) in results.items():
        print(f"  {label:20s} {cpu * 1e6:7.3f} us   {size / n:6.1f} bytes/sample   x{base / cpu:.2f} faster than "
              "the per-sample path")
    (cpu1, bytes1), (cpu2, bytes2) = results["v1"], results["v2"]
    print(f"  v2 / v1: CPU x{cpu2 / cpu1:.2f}, bytes x{bytes2 / bytes1:.2f}")
    print("check: v1 and v2 carry the same samples; the v1 paths write the same bytes")


if __name__ == "__main__":
    main()
