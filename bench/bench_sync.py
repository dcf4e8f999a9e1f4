"""Benchmark: cloud sync over mutual-TLS MQTT to a real mosquitto (drain of a backlog, and live).

Two measurements, each against a mosquitto started here (TLS, ``require_certificate true``, a
throwaway PKI made with ``cryptography``: ``tests.mqtt_broker.make_pki`` and ``Broker``), with a
subscriber in its own process that records every telemetry message (seq, samples, arrival time)
so the figures are checked against what actually arrived:

1. **drain**: a backlog of ``--samples`` samples is put in the outbox while offline, through the
   real path (``Sync.add`` + the batcher's ``Sync._batch`` -> ``TelemetryEncoder`` ->
   ``Outbox.append``, messages of ``mqtt.max_samples`` samples, in a child process), then another
   child process starts a real ``Sync`` (its ``MqttLink`` connects to the broker) and runs until
   the outbox is empty. Reported: samples/s and messages/s from connect to empty, CPU of the
   draining process (us per sample, share of a core), its peak RSS, the broker's and the
   subscriber's CPU; the subscriber must have every seq 1..N exactly once. Run once with
   ``replay_rate`` so high it is not the limit, and once with the default (100,000 samples/s)
   to show the pacing holds.
2. **live**: Modbus TCP float32 devices (pymodbus servers in a child process, as in
   bench_modbus.py) -> the agent (``config.loads`` -> ``Agent.start``, with ``[mqtt]``) -> twin
   -> outbox -> TLS broker, the agent in a child process pinned to one core, everything else on
   the other. Reported over a window after a warm-up: samples/s stored and samples/s that
   reached the subscriber, agent CPU us per sample (``getrusage``, all threads), peak RSS; at the
   end the subscriber's sample count is compared with the twin's history rows.

Run ``python bench/bench_sync.py --help``; bench/README.md has the figures and commands.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import command_line, cpu_seconds, free_port, peak_rss_mb, print_table, process_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.mqtt_broker (PKI, broker) is imported from the repository root
    sys.path.insert(0, str(ROOT))

# Targets from issue 3 ("Benchmark").
TARGET_DRAIN_SAMPLES_PER_S = 200_000
TARGET_DRAIN_RSS_MB = 100.0
TARGET_LIVE_US_PER_SAMPLE = 8.0
TARGET_LIVE_SAMPLES_PER_S = 100_000
DEFAULT_REPLAY_RATE = 100_000.0  # [mqtt] replay_rate's default
UNPACED = 1e9  # a replay_rate that never limits (the most [mqtt] replay_rate accepts)

SITE, GATEWAY = "bench", "bench"
TOPIC_FILTER = f"edge/{SITE}/{GATEWAY}/#"
SEQ = re.compile(rb'"seq":(\d+)')
SAMPLE_MARK = b'{"name":'


def count_samples(payload: bytes) -> int:
    """Samples in a telemetry payload: v1 by its per-sample marker (no parse), v2 by its values arrays."""
    if not payload.startswith(b'{"v":2'):
        return payload.count(SAMPLE_MARK)
    return sum(len(read["values"]) for read in json.loads(payload)["reads"])


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pin(cpu: int | None) -> None:
    """Run this process (and every thread and child it starts from now on) on one core."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def sensor_values(points: int) -> list[float]:
    """float32 readings as a sensor gives them: 20.0..80.0 in odd steps, so most decode to long
    reprs (23.4 is 23.399999618530273 once widened to a Python float), like real plant values."""
    values = [20.0 + (i * 7.31) % 60.0 for i in range(points)]
    return list(struct.unpack(f"{points}f", struct.pack(f"{points}f", *values)))


# --------------------------------------------------------------------------- config


def config_text(data_dir: Path, spec: dict[str, Any], ports: list[int] | None = None) -> str:
    """bench_modbus's config (agent, twin, devices) plus an [mqtt] section for the bench broker."""
    import bench_modbus

    text = bench_modbus.config_text(ports or [], spec["points"], spec["interval"], data_dir)
    mqtt = ["", "[mqtt]", 'host = "localhost"', f"port = {spec['port']}", f"ca_file = {spec['ca']!r}",
            f"cert_file = {spec['cert']!r}", f"key_file = {spec['key']!r}",
            f"max_samples = {spec['max_samples']}", f"max_inflight = {spec['max_inflight']}",
            f'publish_interval = "{spec["publish_interval"]}"', f"replay_rate = {spec['replay_rate']:.0f}",
            f"outbox_max_rows = {spec['outbox_max_rows']}", 'retry_min = "100ms"', 'retry_max = "1s"',
            f"telemetry_version = {spec.get('telemetry_version', 1)}"]
    return text + "\n".join(mqtt) + "\n"  # bench_modbus's agent id and site are both "bench"


def load_config(spec: dict[str, Any], ports: list[int] | None = None) -> Any:
    from edge_agent.config import loads

    data_dir = Path(spec["data_dir"])
    return loads(config_text(data_dir, spec, ports), data_dir / "bench.toml")


def outbox_contents(path: Path) -> dict[str, Any]:
    """Telemetry rows still in an outbox file: count, samples, seq range, and the next seq."""
    with sqlite3.connect(path) as conn:
        rows, samples, low, high = conn.execute(
            "SELECT count(*), coalesce(sum(samples), 0), min(seq), max(seq) FROM messages WHERE kind = 'telemetry'"
        ).fetchone()
        depth = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        next_seq, dropped = conn.execute("SELECT next_telemetry_seq, dropped_samples FROM meta").fetchone()
    return {"rows": rows, "samples": samples, "seq_min": low, "seq_max": high, "depth": depth,
            "last_seq": next_seq - 1, "dropped_samples": dropped}


def other_cpu(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: process_cpu_seconds(pid) for name, pid in pids.items()}


def cpu_delta(start: dict[str, float | None], end: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (end[k] - v if v is not None and end.get(k) is not None else None)  # type: ignore[operator]
            for k, v in start.items()}


def current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- child: subscriber


def run_subscriber(spec: dict[str, Any]) -> None:
    """Subscribe (QoS 1) and record every telemetry message until told how many to expect."""
    import paho.mqtt.client as mqtt

    from tests.mqtt_broker import tls_client

    lock = threading.Condition()
    records: list[tuple[float, int, int, int]] = []  # arrival (monotonic), seq, samples, bytes
    other: dict[str, int] = {}
    subscribed = threading.Event()
    client = tls_client("bench-subscriber", ca=Path(spec["ca"]), cert=Path(spec["sub_cert"]),
                        key=Path(spec["sub_key"]))

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        c.subscribe(TOPIC_FILTER, qos=1)

    def on_subscribe(*_args: Any) -> None:
        subscribed.set()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        payload = msg.payload
        kind = msg.topic.rsplit("/", 1)[1]
        with lock:
            if kind == "telemetry":
                found = SEQ.search(payload, 0, 120)
                records.append((now, int(found.group(1)) if found else -1, count_samples(payload), len(payload)))
            else:
                other[kind] = other.get(kind, 0) + 1
            lock.notify_all()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("localhost", spec["port"], keepalive=30)
    client.loop_start()
    if not subscribed.wait(10):
        raise SystemExit("subscriber: no SUBACK within 10 s")
    print("ready", flush=True)
    # One command on stdin: "<seq_count> <idle_timeout>": wait for that many distinct seqs, or for
    # idle_timeout s without a new message, then report.
    line = sys.stdin.readline().split()
    expect, idle = (int(line[0]), float(line[1])) if line else (0, 0.0)
    with lock:
        while len({r[1] for r in records}) < expect:
            before = len(records)
            lock.wait(idle)
            if len(records) == before:
                break
    client.disconnect()
    client.loop_stop()
    with lock:
        print(json.dumps({"records": records, "other": other}), flush=True)


# --------------------------------------------------------------------------- child: simulated devices


def run_servers(spec: dict[str, Any]) -> None:
    """bench_modbus's pymodbus servers, serving sensor-like float32 values instead of i * 0.25."""
    import bench_modbus

    if spec["values"] == "sensor":
        def registers(points: int) -> list[int]:
            data = struct.pack(f">{points}f", *sensor_values(points))
            return list(struct.unpack(f">{2 * points}H", data))

        bench_modbus.register_values = registers
    asyncio.run(bench_modbus.serve(spec["ports"], spec["points"]))


# --------------------------------------------------------------------------- child: fill (offline)


async def fill(spec: dict[str, Any]) -> dict[str, Any]:
    """Put ``samples`` into the outbox the way an offline agent does: Sync.add, then the batcher's step."""
    from drivers.base import Reading
    from edge_agent.cloud.sync import Sync
    from edge_agent.store.messages import OutboxLimits
    from edge_agent.store.outbox import Outbox

    pin(spec["agent_cpu"])
    config = load_config(spec)
    mqtt = config.mqtt
    outbox = Outbox.open(config.agent.data_dir / "outbox.db", max_inflight=mqtt.max_inflight,
                         limits=OutboxLimits(max_rows=mqtt.outbox_max_rows, max_bytes=mqtt.outbox_max_bytes),
                         synchronous=mqtt.outbox_sync)
    sync = Sync(config, outbox, snapshot=list)  # never started: the link stays down, as offline
    names = [f"dev{d:03d}.p{p:05d}" for d in range(spec["devices"]) for p in range(spec["points"])]
    values = sensor_values(len(names))
    per_batch = spec["fill_batch"]  # samples gathered per publish interval
    ts, done, seconds, cpu = time.time() - 3600.0, 0, 0.0, 0.0
    while done < spec["samples"]:
        n = min(per_batch, spec["samples"] - done)
        readings = []
        for i in range(done, done + n):  # one scan of every point after another, 1 ms apart
            j = i % len(names)
            readings.append(Reading(names[j], values[j], "good", ts + i // len(names) * 1e-3))
        start, start_cpu = time.perf_counter(), cpu_seconds()
        sync.add(readings)
        await sync._batch()  # what the batcher task does every publish_interval
        seconds += time.perf_counter() - start
        cpu += cpu_seconds() - start_cpu
        done += n
    outbox.close()
    content = outbox_contents(config.agent.data_dir / "outbox.db")
    return {"samples": done, "seconds": seconds, "cpu": cpu, "contents": content}


# --------------------------------------------------------------------------- child: drain


async def drain(spec: dict[str, Any]) -> dict[str, Any]:
    """A real Sync drains the outbox to the broker; measured from start to empty."""
    from edge_agent.cloud.sync import Sync
    from edge_agent.store.messages import OutboxLimits
    from edge_agent.store.outbox import Outbox

    pin(spec["agent_cpu"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(spec)
    mqtt = config.mqtt
    path = config.agent.data_dir / "outbox.db"
    backlog = outbox_contents(path)
    outbox = Outbox.open(path, max_inflight=mqtt.max_inflight,
                         limits=OutboxLimits(max_rows=mqtt.outbox_max_rows, max_bytes=mqtt.outbox_max_bytes),
                         synchronous=mqtt.outbox_sync)
    rss_before = current_rss_mb()
    sync = Sync(config, outbox, snapshot=list)
    watched = spec["watch"]
    cpu0, wall0, mono0, others0 = cpu_seconds(), time.perf_counter(), time.monotonic(), other_cpu(watched)
    sync.start()
    async with asyncio.timeout(30):
        await sync.link.connected.wait()
    connected = time.perf_counter()
    rss_peak_seen = current_rss_mb()
    deadline = time.monotonic() + spec["timeout"]
    while True:
        await asyncio.sleep(0.02)
        rss_peak_seen = max(rss_peak_seen, current_rss_mb())
        if outbox.stats().depth == 0:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"drain: outbox not empty after {spec['timeout']:g} s: {outbox.stats()}")
    wall1, cpu1, mono1, others1 = time.perf_counter(), cpu_seconds(), time.monotonic(), other_cpu(watched)
    peak = peak_rss_mb()
    # A clean stop is logged as "connection lost (Normal disconnection)" at WARNING; not news here.
    logging.getLogger("edge_agent.cloud.link").setLevel(logging.ERROR)
    await sync.stop()
    outbox.close()
    return {"backlog": backlog, "seconds": wall1 - wall0, "connect_seconds": connected - wall0, "cpu": cpu1 - cpu0,
            "rss_before": rss_before, "rss_peak": peak, "rss_peak_seen": rss_peak_seen, "published": sync.published,
            "acked": sync.acked, "mono": [mono0, mono1], "others": cpu_delta(others0, others1),
            "after": outbox_contents(path)}


# --------------------------------------------------------------------------- child: live agent


async def live(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole agent with Modbus devices and [mqtt]; measured over a window after a warm-up."""
    from edge_agent.agent import Agent

    pin(spec["agent_cpu"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(spec, spec["ports"])
    agent = Agent(config)
    await agent.start()
    assert agent.sync is not None
    sync = agent.sync
    async with asyncio.timeout(30):
        await sync.link.connected.wait()
    progress(f"agent connected; warm-up {spec['warmup']:g} s")
    await asyncio.sleep(spec["warmup"])
    watched = spec["watch"]

    def reads() -> int:
        return sum(r.status.reads for r in agent.runners.values())

    stored0, reads0, acked0 = agent.stored, reads(), sync.acked
    cpu0, wall0, mono0, others0 = cpu_seconds(), time.perf_counter(), time.monotonic(), other_cpu(watched)
    progress(f"measuring for {spec['seconds']:g} s")
    deadline, aborted = time.monotonic() + spec["seconds"], False
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.5))
        if peak_rss_mb() > spec["max_rss"]:
            aborted = True
            progress(f"peak RSS passed {spec['max_rss']:g} MB: the agent is falling behind; stopping early")
            break
    wall1, cpu1, mono1, others1 = time.perf_counter(), cpu_seconds(), time.monotonic(), other_cpu(watched)
    stored1, reads1, acked1 = agent.stored, reads(), sync.acked
    rss = peak_rss_mb()
    depth = outbox_contents(config.agent.data_dir / "outbox.db")  # how far the link is behind, at the end
    progress("stopping the agent (it delivers what is pending for up to 2 s)")
    logging.getLogger("edge_agent.cloud.link").setLevel(logging.ERROR)  # "connection lost" on a clean stop
    await agent.stop()
    with sqlite3.connect(config.twin_path) as conn:
        history = conn.execute("SELECT count(*) FROM history").fetchone()[0]
    return {"seconds": wall1 - wall0, "cpu": cpu1 - cpu0, "stored": stored1 - stored0, "reads": reads1 - reads0,
            "acked": acked1 - acked0, "mono": [mono0, mono1], "others": cpu_delta(others0, others1), "rss": rss,
            "aborted": aborted, "total_stored": agent.stored, "history": history,
            "flush_errors": agent.writer.flush_errors if agent.writer else 0,
            "down": [r.device.name for r in agent.runners.values() if r.status.state != "up"],
            "depth_at_end": depth, "after": outbox_contents(config.agent.data_dir / "outbox.db")}


# --------------------------------------------------------------------------- orchestration (parent)


class Child:
    """This script in another role, in its own process; its last stdout line is a JSON result."""

    def __init__(self, role: str, spec: dict[str, Any], *, stdin: bool = False) -> None:
        self.role = role
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--role", role, "--spec", json.dumps(spec)], text=True,
            stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise SystemExit(f"{self.role} did not start (got {line!r}, exit {self.process.wait()})")

    def result(self, send: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        out, _ = self.process.communicate(send, timeout=timeout)
        if self.process.returncode != 0:
            raise SystemExit(f"{self.role} failed with exit status {self.process.returncode}")
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def check_seqs(records: list[list[float]], first: int, last: int) -> dict[str, Any]:
    seqs = [int(r[1]) for r in records]
    distinct = set(seqs)
    expected = set(range(first, last + 1)) if last >= first else set()
    return {"messages": len(seqs), "distinct": len(distinct), "duplicates": len(seqs) - len(distinct),
            "missing": len(expected - distinct), "unexpected": len(distinct - expected),
            "seq_min": min(seqs) if seqs else None, "seq_max": max(seqs) if seqs else None,
            "samples": sum(int(r[2]) for r in records), "bytes": sum(int(r[3]) for r in records)}


def share(value: float | None, seconds: float) -> str:
    return f"{value / seconds:.0%}" if value is not None and seconds > 0 else "n/a"


def bench_drain(base: dict[str, Any], args: argparse.Namespace, root: Path, replay_rate: float) -> None:
    label = "unpaced" if replay_rate >= UNPACED else f"replay_rate {replay_rate:,.0f}"
    data_dir = root / f"drain-{'unpaced' if replay_rate >= UNPACED else int(replay_rate)}"
    data_dir.mkdir(parents=True, exist_ok=True)
    spec = {**base, "data_dir": str(data_dir), "replay_rate": replay_rate, "ports": []}
    progress(f"drain ({label}): filling the outbox offline with {args.samples:,} samples")
    filled = Child("fill", spec).result()
    backlog = filled["contents"]
    progress(f"drain ({label}): {backlog['rows']:,} telemetry messages queued; subscriber, then the drain")
    subscriber = Child("subscribe", spec, stdin=True)
    subscriber.wait_ready()
    spec["watch"] = {"broker": base["broker_pid"], "subscriber": subscriber.pid}
    drained = Child("drain", spec).result()
    got = subscriber.result(f"{backlog['rows']} 5\n", timeout=600)
    records = got["records"]
    seqs = check_seqs(records, 1, backlog["last_seq"])
    seconds = drained["seconds"]
    samples, messages = backlog["samples"], backlog["rows"]
    arrivals = [r[0] for r in records]
    sub_seconds = (max(arrivals) - drained["mono"][0]) if arrivals else float("nan")
    others = drained["others"]
    mib = 1024 * 1024
    print(f"\ncommand: {command_line()}")
    print(f"drain, {label}: {samples:,} samples in {messages:,} telemetry messages of {args.max_samples} samples "
          f"({backlog['rows'] and seqs['bytes'] / max(1, seqs['messages']) / 1024:.1f} KiB each), "
          f"max_inflight {args.max_inflight}, agent on CPU {base['agent_cpu']}, broker and subscriber on "
          f"{base['other_cpus']}")
    target_rate = f">= {TARGET_DRAIN_SAMPLES_PER_S:,}" if replay_rate >= UNPACED else f"~ {replay_rate:,.0f} (paced)"
    print_table(f"drain to mosquitto over mutual TLS ({label})", ["figure", "measured", "target"], [
        ["samples/s (start -> outbox empty)", f"{samples / seconds:,.0f}", target_rate],
        ["messages/s", f"{messages / seconds:,.1f}", ""],
        ["seconds (of which connect)", f"{seconds:.2f} ({drained['connect_seconds']:.2f})", ""],
        ["samples/s at the subscriber (start -> last arrival)", f"{seqs['samples'] / sub_seconds:,.0f}", ""],
        ["MiB/s of payload", f"{seqs['bytes'] / mib / seconds:.1f}", ""],
        ["agent CPU us/sample", f"{1e6 * drained['cpu'] / samples:.2f}", ""],
        ["agent CPU, share of one core", share(drained["cpu"], seconds), ""],
        ["peak RSS MB (draining process)", f"{drained['rss_peak']:.1f}", f"<= {TARGET_DRAIN_RSS_MB:g}"],
        ["RSS MB before the drain", f"{drained['rss_before']:.1f}", ""],
        ["broker CPU, share of its core", share(others.get("broker"), seconds), ""],
        ["subscriber CPU, share of its core", share(others.get("subscriber"), seconds), ""],
        ["fill: samples/s offline (Sync -> encoder -> outbox)", f"{filled['samples'] / filled['seconds']:,.0f}", ""],
        ["fill: CPU us/sample", f"{1e6 * filled['cpu'] / filled['samples']:.2f}", ""],
    ])
    print(f"\ncheck: subscriber got {seqs['messages']:,} telemetry messages, seq {seqs['seq_min']}..{seqs['seq_max']}, "
          f"{seqs['samples']:,} samples; missing {seqs['missing']}, duplicates {seqs['duplicates']}, "
          f"dropped by the outbox {backlog['dropped_samples']}; outbox depth after {drained['after']['depth']}")
    problems = []
    if seqs["missing"] or seqs["unexpected"] or seqs["samples"] != samples:
        problems.append(f"the subscriber did not get exactly seq 1..{backlog['last_seq']} "
                        f"({seqs['samples']:,} of {samples:,} samples)")
    if backlog["dropped_samples"]:
        problems.append(f"the outbox dropped {backlog['dropped_samples']:,} samples while filling")
    for problem in problems:
        print(f"WARNING: {problem}")


def bench_live(base: dict[str, Any], args: argparse.Namespace, root: Path) -> None:
    data_dir = root / "live"
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(args.devices)]
    spec = {**base, "data_dir": str(data_dir), "replay_rate": DEFAULT_REPLAY_RATE, "ports": ports,
            "values": args.values}
    servers = Child("serve", spec)
    servers.wait_ready()
    subscriber = Child("subscribe", spec, stdin=True)
    try:
        subscriber.wait_ready()
        spec["watch"] = {"broker": base["broker_pid"], "subscriber": subscriber.pid, "servers": servers.pid}
        progress(f"live: {args.devices} devices x {args.points} points every {args.interval}")
        result = Child("live", spec).result()
    finally:
        servers.stop()
    after = result["after"]
    delivered_last = after["last_seq"]
    got = subscriber.result(f"{delivered_last - after['rows']} 5\n", timeout=120)
    records = got["records"]
    seqs = check_seqs(records, 1, delivered_last)
    mono0, mono1 = result["mono"]
    window_samples = sum(int(r[2]) for r in records if mono0 <= r[0] < mono1)
    seconds = result["seconds"]
    stored = result["stored"]
    us = 1e6 * result["cpu"] / stored if stored else float("nan")
    from edge_agent.config.table import parse_duration

    interval = parse_duration(args.interval)
    offered = args.devices * args.points / interval
    others = result["others"]
    print(f"\ncommand: {command_line()}")
    print(f"live: {args.devices} devices x {args.points} float32 points ({args.values} values) every {args.interval} "
          f"(offered {offered:,.0f} samples/s), mqtt.max_samples {args.max_samples}, publish_interval "
          f"{args.publish_interval}, max_inflight {args.max_inflight}; agent pinned to CPU {base['agent_cpu']}, "
          f"servers, broker and subscriber on {base['other_cpus']}; warm-up {args.warmup:g} s, window {seconds:.1f} s")
    print_table("live: Modbus float32 -> agent -> twin -> outbox -> mosquitto (mutual TLS) -> subscriber",
                ["figure", "measured", "target"], [
                    ["samples/s stored in the twin", f"{stored / seconds:,.0f}", f">= {TARGET_LIVE_SAMPLES_PER_S:,}"],
                    ["samples/s arriving at the subscriber", f"{window_samples / seconds:,.0f}",
                     f">= {TARGET_LIVE_SAMPLES_PER_S:,}"],
                    ["agent CPU us/sample", f"{us:.2f}", f"<= {TARGET_LIVE_US_PER_SAMPLE:g}"],
                    ["agent CPU, share of its core", share(result["cpu"], seconds), ""],
                    ["peak RSS MB (agent process)", f"{result['rss']:.1f}", ""],
                    ["device reads done / due", f"{result['reads']:,} / {args.devices * seconds / interval:,.0f}", ""],
                    ["outbox depth at the window's end (messages)", f"{result['depth_at_end']['depth']:,}", ""],
                    ["servers CPU, share of their core", share(others.get("servers"), seconds), ""],
                    ["broker CPU, share of its core", share(others.get("broker"), seconds), ""],
                    ["subscriber CPU, share of its core", share(others.get("subscriber"), seconds), ""],
                ])
    difference = result["history"] - seqs["samples"]
    unsent = result["history"] - result["total_stored"]
    print(f"\ncheck: twin history rows {result['history']:,} (Agent.stored {result['total_stored']:,}); "
          f"subscriber got {seqs['samples']:,} samples in {seqs['messages']:,} telemetry messages, "
          f"seq {seqs['seq_min']}..{seqs['seq_max']} (missing {seqs['missing']}, duplicates {seqs['duplicates']}); "
          f"still in the outbox after stop: {after['rows']} messages, {after['samples']:,} samples; "
          f"difference twin - subscriber = {difference:,}"
          f"{'' if difference == after['samples'] else '  MISMATCH (not explained by the outbox)'}")
    problems = []
    if result["aborted"]:
        problems.append(f"stopped early: peak RSS passed --max-rss {args.max_rss:g} MB")
    if result["down"]:
        problems.append(f"devices not up at the end: {', '.join(result['down'])}")
    if result["flush_errors"]:
        problems.append(f"{result['flush_errors']} failed twin flushes")
    if stored / seconds < 0.95 * offered:
        problems.append(f"stored {stored / seconds:,.0f} of {offered:,.0f} offered samples/s: the agent fell behind")
    if unsent:
        problems.append(f"{unsent:,} samples are in the twin's history but were never handed to Sync (not in "
                        "Agent.stored): a twin flush cancelled by stop() completed its write, but Agent.flush "
                        "skipped the bookkeeping after it, so they never reach the cloud")
    for problem in problems:
        print(f"WARNING: {problem}")


def orchestrate(args: argparse.Namespace, root: Path) -> None:
    from tests.mqtt_broker import Broker, make_pki

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    agent_cpu = args.agent_cpu if args.agent_cpu is not None else (cpus[0] if len(cpus) > 1 else None)
    others = [c for c in cpus if c != agent_cpu]
    if agent_cpu is not None and others:
        os.sched_setaffinity(0, set(others))  # the broker, servers and subscriber inherit this
    pki = make_pki(root / "pki")
    broker = Broker(pki, root / "mosquitto")
    broker.start()
    base = {"port": broker.port, "ca": str(pki.ca_cert), "cert": str(pki.agent_cert), "key": str(pki.agent_key),
            "sub_cert": str(pki.operator_cert), "sub_key": str(pki.operator_key), "max_samples": args.max_samples,
            "max_inflight": args.max_inflight, "publish_interval": args.publish_interval,
            "outbox_max_rows": max(100_000, 2 * args.samples // args.max_samples), "samples": args.samples,
            "devices": args.devices, "points": args.points, "interval": args.interval, "seconds": args.seconds,
            "warmup": args.warmup, "max_rss": args.max_rss, "agent_cpu": agent_cpu, "timeout": args.timeout,
            "fill_batch": args.fill_batch, "telemetry_version": args.telemetry_version,
            "broker_pid": broker._process.pid if broker._process else 0,
            "other_cpus": ",".join(map(str, others)) or "any"}
    try:
        if "drain" in args.only:
            for rate in args.replay_rates:
                bench_drain(base, args, root, rate)
        if "live" in args.only:
            bench_live(base, args, root)
    finally:
        broker.stop()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", choices=("drain", "live", "both"), default="both", help="which measurement")
    parser.add_argument("--samples", type=int, default=1_000_000, help="drain: backlog size in samples")
    parser.add_argument("--max-samples", type=int, default=1000, help="mqtt.max_samples: samples per message")
    parser.add_argument("--max-inflight", type=int, default=20, help="mqtt.max_inflight")
    parser.add_argument("--telemetry-version", type=int, choices=(1, 2), default=1,
                        help="mqtt.telemetry_version: 1 (an object per sample) or 2 (compact)")
    parser.add_argument("--publish-interval", default="1s", help="mqtt.publish_interval")
    parser.add_argument("--replay-rate", dest="replay_rates", default=f"{UNPACED:g},{DEFAULT_REPLAY_RATE:g}",
                        help="drain: mqtt.replay_rate values to run, comma-separated (one drain each)")
    parser.add_argument("--fill-batch", type=int, default=100_000,
                        help="drain: samples gathered per publish interval while filling")
    parser.add_argument("--timeout", type=float, default=600.0, help="drain: give up after this many seconds")
    parser.add_argument("--devices", type=int, default=10, help="live: simulated Modbus devices")
    parser.add_argument("--points", type=int, default=2000, help="float32 points per device")
    parser.add_argument("--interval", default="200ms", help="live: poll interval of every device")
    parser.add_argument("--values", choices=("sensor", "quarter"), default="sensor",
                        help="live: register values: sensor-like float32 (long reprs) or i * 0.25 (short)")
    parser.add_argument("--seconds", type=float, default=20.0, help="live: measuring window")
    parser.add_argument("--warmup", type=float, default=5.0, help="live: seconds run before the window opens")
    parser.add_argument("--max-rss", type=float, default=1000.0, help="live: MB of peak RSS at which to stop early")
    parser.add_argument("--agent-cpu", type=int, help="core for the agent (default: the first; others get the rest)")
    parser.add_argument("--data-dir", type=Path, help="where outboxes, twin, PKI go (default: temporary, removed)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = ("drain", "live") if args.only == "both" else (args.only,)
    try:
        args.replay_rates = [float(r) for r in args.replay_rates.split(",") if r]
    except ValueError:
        parser.error("--replay-rate: numbers separated by commas")
    if not 1 <= args.max_samples <= 100_000:
        parser.error("--max-samples: 1..100000 (the [mqtt] max_samples range)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role:
        spec = json.loads(args.spec)
        if args.role == "subscribe":
            run_subscriber(spec)
        elif args.role == "serve":
            run_servers(spec)
        else:
            role = {"fill": fill, "drain": drain, "live": live}[args.role]
            print(json.dumps(asyncio.run(role(spec))), flush=True)
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        orchestrate(args, args.data_dir.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        orchestrate(args, Path(tmp))


if __name__ == "__main__":
    main()
