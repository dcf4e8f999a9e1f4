"""Benchmark: the whole agent on real plant shapes, as a process, measured from the outside.

A plant shape is ``DxR@INTERVAL``: D Modbus TCP devices (unit ids 1..D behind one Modbus TCP
server process, one connection per configured device, as a TCP gateway in front of many drives
would be) with R float32 points each, polled every INTERVAL; the values change every 100 ms. The
agent runs as its own process (``python -m edge_agent.cli run --config ...``, pinned to core 0;
everything else on core 1), with ``[mqtt]`` to a local mosquitto over mutual TLS (QoS 1). A
subscriber in another process counts the samples that arrive and their age (arrival time minus
the sample's source time). After a warm-up, over a measuring window:

- offered: D * R / INTERVAL samples per second;
- delivered: samples counted at the subscriber in the window, as a share of offered;
- CPU us/point: the agent process's user + sys time from /proc (all threads) per delivered sample
  (per stored sample when the shape runs without MQTT);
- age p50/p99 at the subscriber (the oldest sample of each message, weighted by its samples);
- RSS at the end of the window and its peak (VmRSS, VmHWM), and whether RSS grew over the window.

``--baseline REF`` builds another version of edge-agent (a git ref of this repository) into a
venv of its own (cached under ``~/.cache/edge-agent-bench``) and runs every shape with it in the
same run, alternating with this checkout, then prints the ratio of CPU per point. Not a pass/fail
test: it prints figures. Run ``python bench/bench_plant.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import command_line, free_port, print_table, process_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.mqtt_broker (PKI, broker) is imported from the repository root
    sys.path.insert(0, str(ROOT))

SITE, GATEWAY = "bench", "plant"
TOPIC = f"edge/{SITE}/{GATEWAY}/telemetry"
CHANGE_PERIOD = 0.1  # the simulated values change this often (seconds)
CACHE = Path.home() / ".cache" / "edge-agent-bench"
AGENT_CPU, OTHERS_CPU = 0, 1

SHAPES = ["10x100@1s", "10x100@100ms", "20x125@100ms", "40x125@100ms", "80x125@100ms", "20x125@100ms:twin"]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


# --------------------------------------------------------------------------- the Modbus TCP server


class PlantServer(asyncio.Protocol):
    """A minimal Modbus TCP server (function codes 3 and 4) for unit ids 1..D, R float32 each.

    Hand-written rather than pymodbus's server so the devices are never what limits the agent: one
    request costs a slice of a bytes object prepared once per value change.
    """

    banks: list[bytes] = []  # per unit id - 1: the holding registers as big-endian bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 8:
            tid, _proto, length, unit = struct.unpack(">HHHB", self.buffer[:7])
            end = 6 + length
            if len(self.buffer) < end:
                return
            pdu, self.buffer = self.buffer[7:end], self.buffer[end:]
            self.transport.write(self.answer(tid, unit, pdu))

    def answer(self, tid: int, unit: int, pdu: bytes) -> bytes:
        function = pdu[0]
        if function not in (3, 4) or len(pdu) != 5:
            body = bytes((function | 0x80, 1))
        elif not 1 <= unit <= len(self.banks):
            body = bytes((function | 0x80, 0x0B))  # gateway target device failed to respond
        else:
            address, count = struct.unpack(">HH", pdu[1:5])
            bank = self.banks[unit - 1]
            if count < 1 or count > 125 or 2 * (address + count) > len(bank):
                body = bytes((function | 0x80, 2))
            else:
                body = bytes((function, 2 * count)) + bank[2 * address:2 * (address + count)]
        return struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body


async def serve(port: int, devices: int, points: int) -> None:
    import numpy as np

    base = np.arange(devices * points, dtype=np.float64).reshape(devices, points) * 0.5 + 20.0
    tick = 0

    def refresh() -> None:
        values = base + (tick % 1000) * 0.01
        PlantServer.banks = [row.astype(">f4").tobytes() for row in values]

    refresh()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(PlantServer, "127.0.0.1", port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += CHANGE_PERIOD
        try:
            async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                await stop.wait()
        except TimeoutError:
            tick += 1
            refresh()
    server.close()


# --------------------------------------------------------------------------- the subscriber


def subscribe(port: int, ca: Path, cert: Path, key: Path) -> None:
    """Count samples and their ages; on "window START END" (monotonic) on stdin, report that window."""
    from tests.mqtt_broker import tls_client

    lock = threading.Lock()
    records: list[tuple[float, int, float]] = []  # arrival (monotonic), samples, age of the oldest sample
    sample_mark, ts_mark = re.compile(rb'"ts":'), re.compile(rb'"ts":([0-9.]+)')
    ready = threading.Event()
    client = tls_client("bench-plant-subscriber", ca=ca, cert=cert, key=key)

    def on_connect(c: Any, *_: Any) -> None:
        c.subscribe(TOPIC, qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        now_mono, now_wall = time.monotonic(), time.time()
        payload = msg.payload
        if payload.startswith(b'{"v":1'):
            samples = len(sample_mark.findall(payload))
            stamps = [float(m) for m in ts_mark.findall(payload[:4000])] or [now_wall]
        else:  # another payload version: parse it (slow, but correct)
            doc = json.loads(payload)
            samples, stamps = _count_samples(doc)
        with lock:
            records.append((now_mono, samples, now_wall - min(stamps)))

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: ready.set()
    client.on_message = on_message
    client.connect("localhost", port, keepalive=30)
    client.loop_start()
    if not ready.wait(10):
        raise SystemExit("subscriber: no SUBACK within 10 s")
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "window":
            break
        start, end = float(parts[1]), float(parts[2])
        with lock:
            inside = [r for r in records if start <= r[0] < end]
            total = sum(r[1] for r in records)
        print(json.dumps({"samples": sum(r[1] for r in inside), "ages": [[r[2], r[1]] for r in inside],
                          "total": total}), flush=True)
    client.disconnect()
    client.loop_stop()


def _count_samples(doc: dict[str, Any]) -> tuple[int, list[float]]:
    """Samples and source times of a telemetry payload of any version we know."""
    if "points" in doc:
        return len(doc["points"]), [p["ts"] for p in doc["points"]] or [time.time()]
    reads = doc.get("reads", [])
    return sum(len(r.get("values", [])) for r in reads), [r["ts"] for r in reads] or [time.time()]


# --------------------------------------------------------------------------- one run


@dataclass
class Shape:
    devices: int
    points: int
    interval: float
    mqtt: bool = True
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Shape:
        match = re.fullmatch(r"(\d+)x(\d+)@(\d+(?:\.\d+)?)(ms|s)(:twin)?", text)
        if not match:
            raise argparse.ArgumentTypeError(f"expected DxR@INTERVAL[:twin] like 20x125@100ms, got {text!r}")
        interval = float(match.group(3)) * (0.001 if match.group(4) == "ms" else 1.0)
        return cls(int(match.group(1)), int(match.group(2)), interval, match.group(5) is None, text)

    @property
    def offered(self) -> float:
        return self.devices * self.points / self.interval


@dataclass
class Result:
    version: str
    shape: Shape
    seconds: float
    cpu: float
    delivered: int
    ages: list[tuple[float, int]] = field(default_factory=list)
    rss_mb: float = 0.0
    hwm_mb: float = 0.0
    rss_growth_mb: float = 0.0

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def share(self) -> float:
        return self.rate / self.shape.offered

    @property
    def us_per_point(self) -> float:
        return 1e6 * self.cpu / self.delivered if self.delivered else float("nan")

    def age(self, q: float) -> float:
        if not self.ages:
            return float("nan")
        ordered = sorted(self.ages)
        total, seen = sum(n for _, n in ordered), 0
        for age, n in ordered:
            seen += n
            if seen >= q * total:
                return age
        return ordered[-1][0]


def config_text(shape: Shape, data_dir: Path, modbus_port: int, broker_port: int | None, pki: Any) -> str:
    lines = ["[agent]", f'id = "{GATEWAY}"', f'site = "{SITE}"', f"data_dir = {str(data_dir)!r}",
             'log_level = "warning"', ""]
    if broker_port is not None:
        lines += ["[mqtt]", 'host = "localhost"', f"port = {broker_port}", f"ca_file = {str(pki.ca_cert)!r}",
                  f"cert_file = {str(pki.agent_cert)!r}", f"key_file = {str(pki.agent_key)!r}", ""]
    interval = f"{round(shape.interval * 1000)}ms"
    for d in range(shape.devices):
        lines += ["[[devices]]", f'name = "d{d + 1:03d}"', 'protocol = "modbus"', 'host = "127.0.0.1"',
                  f"port = {modbus_port}", f"unit_id = {d + 1}", f'interval = "{interval}"', ""]
        for p in range(shape.points):
            lines += ["  [[devices.points]]", f'  name = "d{d + 1:03d}.p{p:03d}"', f"  address = {2 * p}",
                      '  type = "float32"', ""]
    return "\n".join(lines)


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def history_rows(twin: Path) -> int:
    """Samples in the twin's history (through its ``history`` table or view)."""
    import sqlite3

    with sqlite3.connect(f"file:{twin}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM history").fetchone()[0])


class Child:
    """A child process that prints "ready" once it is serving."""

    def __init__(self, command: list[str], cpu: int, *, cwd: Path, stdin: bool = False) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None,
                                        text=True, cwd=cwd, preexec_fn=lambda: pin(cpu))
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise SystemExit(f"{command[:4]} did not start (got {line!r})")

    def ask(self, line: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return dict(json.loads(self.process.stdout.readline()))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def run_once(version: str, python: str, shape: Shape, args: argparse.Namespace, pki: Any,
             broker_port: int | None, subscriber: Child | None, work: Path) -> Result:
    data_dir = work / f"data-{version}-{shape.text.replace('@', '_').replace(':', '_')}-{time.monotonic_ns()}"
    data_dir.mkdir()
    modbus_port = free_port()
    server = Child([sys.executable, __file__, "--serve", str(modbus_port), str(shape.devices), str(shape.points)],
                   OTHERS_CPU, cwd=work)
    config = data_dir / "agent.toml"
    config.write_text(config_text(shape, data_dir, modbus_port, broker_port if shape.mqtt else None, pki))
    # cwd outside any checkout, so the baseline imports its own edge_agent
    agent = subprocess.Popen([python, "-m", "edge_agent.cli", "run", "--config", str(config)], cwd=work,
                             stderr=open(data_dir / "agent.log", "w"), preexec_fn=lambda: pin(AGENT_CPU))  # noqa: SIM115
    try:
        time.sleep(args.warmup)  # a warm-up, not a wait for a condition: the agent runs on its own
        if agent.poll() is not None:
            raise SystemExit(f"{version}: the agent exited with {agent.returncode}; see {data_dir / 'agent.log'}")
        rss0, _ = memory_mb(agent.pid)
        start_mono, start_cpu = time.monotonic(), process_cpu_seconds(agent.pid) or 0.0
        rows0 = 0 if shape.mqtt else history_rows(data_dir / "twin.db")
        time.sleep(args.seconds)
        end_mono, end_cpu = time.monotonic(), process_cpu_seconds(agent.pid) or 0.0
        rows1 = 0 if shape.mqtt else history_rows(data_dir / "twin.db")
        rss1, hwm = memory_mb(agent.pid)
        report = subscriber.ask(f"window {start_mono} {end_mono}") if shape.mqtt and subscriber else None
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        server.stop()
    delivered = report["samples"] if report else rows1 - rows0
    ages = [(float(a), int(n)) for a, n in report["ages"]] if report else []
    result = Result(version, shape, end_mono - start_mono, end_cpu - start_cpu, delivered, ages, rss1, hwm, rss1 - rss0)
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


# --------------------------------------------------------------------------- the baseline


def baseline_python(ref: str) -> tuple[str, str]:
    """A venv holding edge-agent at git ``ref``; returns (its python, the commit)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    home = CACHE / commit
    python = home / "venv" / "bin" / "python"
    if (home / "ok").exists():
        return str(python), commit
    shutil.rmtree(home, ignore_errors=True)
    src = home / "src"
    src.mkdir(parents=True)
    progress(f"building baseline {ref} ({commit[:12]}) into {home}")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(src)],
                   check=True)
    (home / "ok").write_text(commit)
    return str(python), commit


# --------------------------------------------------------------------------- orchestration


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", type=Shape.parse, help="DxR@INTERVAL[:twin] (repeatable; "
                        f"default: {' '.join(SHAPES)}); ':twin' runs without [mqtt]")
    parser.add_argument("--baseline", metavar="REF", help="also run a git ref of this repository, e.g. 53f8bbe")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before the window (default 8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window (default 20)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per shape and version; medians are shown")
    parser.add_argument("--keep", action="store_true", help="keep each run's data folder (twin, outbox, log)")
    parser.add_argument("--serve", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--subscribe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    if args.subscribe:
        subscribe(int(args.subscribe[0]), *(Path(a) for a in args.subscribe[1:]))
        return
    shapes = args.shape or [Shape.parse(s) for s in SHAPES]
    versions = [("this", sys.executable)]
    if args.baseline:
        python, commit = baseline_python(args.baseline)
        versions.insert(0, (f"{args.baseline} ({commit[:7]})" if args.baseline != commit[:len(args.baseline)]
                            else commit[:7], python))
    print(f"command: {command_line()}")
    from tests.mqtt_broker import Broker, make_pki

    with tempfile.TemporaryDirectory(prefix="bench-plant-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        pin(OTHERS_CPU)  # this orchestrator, the broker and the subscriber share core 1
        with Broker(pki, work / "broker") as broker:
            subscriber = Child([sys.executable, __file__, "--subscribe", str(broker.port), str(pki.ca_cert),
                                str(pki.operator_cert), str(pki.operator_key)], OTHERS_CPU, cwd=work, stdin=True)
            results: list[Result] = []
            try:
                for shape in shapes:
                    for _ in range(args.repeat):
                        order = versions if len(results) % 2 == 0 else versions[::-1]  # alternate against drift
                        for version, python in order:
                            progress(f"{shape.text}: {version}")
                            results.append(run_once(version, python, shape, args, pki, broker.port, subscriber,
                                                    work))
            finally:
                subscriber.stop()
    report(shapes, [v for v, _ in versions], results)


def report(shapes: list[Shape], versions: list[str], results: list[Result]) -> None:
    rows = []
    for shape in shapes:
        for version in versions:
            mine = [r for r in results if r.shape is shape and r.version == version]
            if not mine:
                continue

            def med(values: list[float]) -> float:
                return statistics.median(values)

            delivered = "" if not shape.mqtt else f"{100 * med([r.share for r in mine]):.1f} %"
            ages = "" if not shape.mqtt else (f"{med([r.age(0.5) for r in mine]):.2f} / "
                                              f"{med([r.age(0.99) for r in mine]):.2f}")
            rows.append([shape.text, version, f"{shape.offered:,.0f}", delivered,
                         f"{med([r.us_per_point for r in mine]):.2f}", ages,
                         f"{med([r.rss_mb for r in mine]):.0f} ({med([r.hwm_mb for r in mine]):.0f})",
                         f"{med([r.rss_growth_mb for r in mine]):+.1f}"])
    print_table("plant shapes (D devices x R float32 points @ interval; agent pinned to one core)",
                ["shape", "version", "offered/s", "delivered", "CPU us/point", "age p50/p99 s", "RSS MB (peak)",
                 "RSS growth MB"], rows)
    if len(versions) == 2:
        ratios = []
        for shape in shapes:
            base = [r.us_per_point for r in results if r.shape is shape and r.version == versions[0]]
            this = [r.us_per_point for r in results if r.shape is shape and r.version == versions[1]]
            if base and this:
                ratio = statistics.median(base) / statistics.median(this)
                ratios.append([shape.text, f"{statistics.median(base):.2f}", f"{statistics.median(this):.2f}",
                               f"{ratio:.2f}x"])
        print_table(f"CPU per point: {versions[0]} / this checkout (higher = this checkout is cheaper)",
                    ["shape", "baseline us", "this us", "ratio"], ratios)


if __name__ == "__main__":
    main()
