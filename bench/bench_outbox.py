"""Benchmark: the outbox alone (no network): fill a backlog of telemetry, then drain it.

1. Fill (in a child process, so the drain's peak RSS is its own): ``--samples`` samples in
   telemetry messages of ``--per-message`` points each, JSON payloads exactly as the sync step will
   write them (``{"v":1,"gateway":"gw","seq":N,"points":[{"name","ts","value","quality"}...]}``,
   seq embedded by the builder inside the append transaction), ``--batch`` messages per append
   transaction (one publish interval's worth). Reported: samples/s and messages/s, and the share
   of the time spent building the JSON.
2. Drain, the way the MQTT link will: ``take(max_inflight)`` then ``ack`` of those ids, as if every
   PUBACK came back at once. Reported: samples/s, messages/s, peak RSS of the draining process.
3. File size (database + WAL) after the fill, after the drain, and after ``close`` (which runs
   the incremental vacuum and truncates the WAL).

Run ``python bench/bench_outbox.py --help``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, peak_rss_mb, print_table

from edge_agent.store.messages import Draft, OutboxLimits, Stamp
from edge_agent.store.outbox import Outbox
from edge_agent.store.sqlite import file_bytes

TARGET_DRAIN_SAMPLES_PER_S = 200_000  # issue 3, over TLS to a broker; here without the network
TARGET_RSS_MB = 100.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000, help="backlog size in samples (1000000)")
    parser.add_argument("--per-message", type=int, default=500, help="samples per telemetry message (500)")
    parser.add_argument("--batch", type=int, default=20, help="messages per append transaction (20)")
    parser.add_argument("--max-inflight", type=int, default=100, help="messages taken per drain step (100)")
    parser.add_argument("--synchronous", choices=("normal", "full"), default="normal",
                        help="outbox durability, as [mqtt] outbox_sync (normal)")
    parser.add_argument("--dir", type=Path, help="where the outbox file goes (default: a temporary directory)")
    parser.add_argument("--fill-only", type=Path, help=argparse.SUPPRESS)  # child mode: fill this file
    return parser.parse_args(argv)


def telemetry_builder(points: list[dict[str, object]], timer: list[float]) -> Draft:
    """A Draft whose builder serialises ``points`` with the seq the outbox assigns."""

    def build(stamp: Stamp) -> bytes:
        start = time.perf_counter()
        body: dict[str, object] = {"v": 1, "gateway": "gw", "seq": stamp.seq, "points": points}
        if stamp.gap is not None:
            body.update(stamp.gap.record())
        payload = json.dumps(body, separators=(",", ":")).encode()
        timer[0] += time.perf_counter() - start
        return payload

    return Draft("telemetry", "edge/site/gw/telemetry", build, samples=len(points))


def fill(path: Path, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(1)
    names = [f"chiller{d}.point{p:03d}" for d in range(4) for p in range(250)]
    timer = [0.0]
    messages = samples = 0
    ts = 1_760_000_000.0
    with Outbox.open(path, limits=OutboxLimits(), synchronous=args.synchronous) as outbox:
        seconds = 0.0  # inside append only: making up the points is the devices' work, not the outbox's
        while samples < args.samples:
            drafts = []
            for _ in range(args.batch):
                n = min(args.per_message, args.samples - samples)
                if n <= 0:
                    break
                points = [{"name": names[(samples + i) % len(names)], "ts": round(ts + (samples + i) * 1e-4, 4),
                           "value": round(rng.uniform(0, 100), 3), "quality": "good"} for i in range(n)]
                drafts.append(telemetry_builder(points, timer))
                samples += n
                messages += 1
            start = time.perf_counter()
            outbox.append(drafts)
            seconds += time.perf_counter() - start
        size = file_bytes(path)
        depth = outbox.stats()
    return {"seconds": seconds, "build_seconds": timer[0], "messages": messages, "samples": samples,
            "file_bytes": size, "payload_bytes": depth.bytes, "rss_mb": peak_rss_mb()}


def drain(path: Path, args: argparse.Namespace) -> dict[str, float]:
    messages = samples = 0
    outbox = Outbox.open(path, max_inflight=args.max_inflight, synchronous=args.synchronous)
    expected = 1
    start = time.perf_counter()
    while batch := outbox.take(args.max_inflight):
        for message in batch:
            if message.seq != expected:  # in order, contiguous: the property the receiver checks
                raise SystemExit(f"seq {message.seq} where {expected} was expected")
            expected += 1
            samples += message.samples
        messages += len(batch)
        outbox.ack([m.id for m in batch])
    seconds = time.perf_counter() - start
    after_drain = file_bytes(path)
    rss = peak_rss_mb()
    outbox.close()
    return {"seconds": seconds, "messages": messages, "samples": samples, "file_bytes": after_drain,
            "file_bytes_closed": file_bytes(path), "rss_mb": rss}


def main() -> None:
    args = parse_args()
    if args.fill_only:
        print(json.dumps(fill(args.fill_only, args)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "outbox.db"
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--fill-only", str(path)],
                               check=True, capture_output=True, text=True)
        filled = json.loads(child.stdout.strip().splitlines()[-1])
        drained = drain(path, args)
    mib = 1024 * 1024
    print_table("outbox fill (append, JSON built inside the transaction)", ["", "value"], [
        ["samples", f"{filled['samples']:,.0f}"],
        ["messages", f"{filled['messages']:,.0f} ({args.per_message} samples, {args.batch} per transaction)"],
        ["samples/s", f"{filled['samples'] / filled['seconds']:,.0f}"],
        ["messages/s", f"{filled['messages'] / filled['seconds']:,.0f}"],
        ["JSON share of time", f"{100 * filled['build_seconds'] / filled['seconds']:.0f} %"],
        ["samples/s without JSON", f"{filled['samples'] / (filled['seconds'] - filled['build_seconds']):,.0f}"],
        ["payload MiB", f"{filled['payload_bytes'] / mib:.1f}"],
        ["file MiB after fill", f"{filled['file_bytes'] / mib:.1f}"],
        ["peak RSS MiB (filling process)", f"{filled['rss_mb']:.1f}"],
    ])
    drain_rate = drained["samples"] / drained["seconds"]
    print_table("outbox drain (take max_inflight, ack them; no network)", ["", "value", "target"], [
        ["samples/s", f"{drain_rate:,.0f}", f">= {TARGET_DRAIN_SAMPLES_PER_S:,} (over TLS)"],
        ["messages/s", f"{drained['messages'] / drained['seconds']:,.0f}", ""],
        ["seconds", f"{drained['seconds']:.2f}", ""],
        ["peak RSS MiB (draining process)", f"{drained['rss_mb']:.1f}", f"<= {TARGET_RSS_MB:.0f}"],
        ["file MiB after drain", f"{drained['file_bytes'] / mib:.1f}", ""],
        ["file MiB after close", f"{drained['file_bytes_closed'] / mib:.2f}", ""],
    ])
    print(f"\ncommand: {command_line()}")


if __name__ == "__main__":
    main()
