"""Benchmark: the whole agent on real plant shapes, as a process, measured from the outside.

A plant shape is ``[ua:]DxR@INTERVAL[:twin][:v2][:inflight]``:

- ``DxR@INTERVAL``: D Modbus TCP devices (unit ids 1..D behind one Modbus TCP server process, one
  connection per configured device, as a TCP gateway in front of many drives would be) with R
  float32 points each, polled every INTERVAL.
- ``ua:DxR@INTERVAL``: D OPC UA devices (``protocol = "opcua"``, subscribe mode, security None)
  with R Double variables each, publishing interval = INTERVAL. The D endpoints (D ports) are
  served by one asyncua server in one child process: one address space, one listener per port,
  so every device has its own TCP connection, secure channel, session and subscription, as with
  D servers. (A full asyncua ``Server`` per device costs about 1.9 s of CPU and 40 MB to start:
  20 of them took 39 s and 830 MB, more than the agent being measured.) The server changes the
  values straight in its address space, a batch per tick, through asyncua's data-change
  callbacks (what ``write_attribute_value`` does minus per-call lookups, type checks and the
  deep copy of each value per monitored item), so it can keep up on the other core; asyncua
  still encodes every notification in Python, so at 100,000 notifications/s the server may be
  what limits ``delivered``: its CPU is in the table.
- ``:twin`` runs without ``[mqtt]`` (samples counted in the twin's history instead);
- ``:v2`` sets ``[mqtt] telemetry_version = 2`` (reads grouped by timestamp) for this checkout.
  A ``--baseline`` version runs telemetry v1 for it, and the table says so.
- ``:inflight`` sets ``requests_in_flight = 4`` on this checkout's Modbus devices (a read's
  requests sent together; the bench's server takes them). A ``--baseline`` version ignores it.

In every shape the values change every 100 ms. The agent runs as its own process (``python -m
edge_agent.cli run --config ...`` with this checkout first on PYTHONPATH, pinned to core 0;
everything else on core 1), with ``[mqtt]`` to a local mosquitto over mutual TLS (QoS 1). A
subscriber in another process counts the samples that arrive and their age (arrival time minus
the sample's source time): in telemetry v1 every entry of ``points`` is a sample with its own
``ts``; in v2 every entry of ``reads`` holds ``len(values)`` samples sharing the entry's ``ts``.
After a warm-up, over a measuring window:

- offered: D * R / INTERVAL samples per second;
- delivered: samples counted at the subscriber in the window, as a share of offered;
- CPU us/point: the agent process's user + sys time from /proc (all threads) per delivered sample
  (per stored sample when the shape runs without MQTT);
- age p50/p99 at the subscriber, over every sample;
- RSS at the end of the window and its peak (VmRSS, VmHWM), and whether RSS grew over the window;
- the device server's CPU over the window, as a share of its core (above ~90 % it may be the
  limit, not the agent).

Every generated config is checked with ``edge-agent check-config`` of the version that runs it
before anything starts, so a key one version lacks fails at once, with that version's message.

``--baseline REF`` builds another version of edge-agent (a git ref of this repository) into a
venv of its own (cached under ``~/.cache/edge-agent-bench``) and runs every shape with it in the
same run, alternating with this checkout, then prints the ratio of CPU per point.
``--profile`` runs this checkout's agent under cProfile (one shape) and prints the 30 functions
with the most own time; its CPU figures are not comparable with unprofiled runs. ``--env``
prints the machine and library versions first. Not a pass/fail test: it prints figures. Run
``python bench/bench_plant.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
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
from collections import Counter
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
UA_NAMESPACE = "urn:edge-agent:bench-plant"
UA_FOLDER_SIZE = 100  # variables per folder: asyncua's add_variable slows down with a parent's child count
SATURATED = 0.9  # a server process above this share of its core may be what limits delivery

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


async def every_change_period(stop: asyncio.Event, change: Any) -> None:
    """Call ``change(tick)`` every CHANGE_PERIOD until ``stop``; a late tick is skipped, not caught up."""
    tick, next_at = 0, time.monotonic()
    while not stop.is_set():
        next_at = max(next_at + CHANGE_PERIOD, time.monotonic())
        try:
            async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                await stop.wait()
        except TimeoutError:
            tick += 1
            await change(tick)


def stop_on_sigterm() -> asyncio.Event:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


async def serve(port: int, devices: int, points: int) -> None:
    import numpy as np

    base = np.arange(devices * points, dtype=np.float64).reshape(devices, points) * 0.5 + 20.0

    async def refresh(tick: int) -> None:
        values = base + (tick % 1000) * 0.01
        PlantServer.banks = [row.astype(">f4").tobytes() for row in values]

    await refresh(0)
    server = await asyncio.get_running_loop().create_server(PlantServer, "127.0.0.1", port)
    stop = stop_on_sigterm()
    print("ready", flush=True)
    await every_change_period(stop, refresh)
    server.close()


# --------------------------------------------------------------------------- the OPC UA server


def ua_node(device: int, point: int, points: int) -> str:
    """The string identifier of a variable (and the agent's point name): d001.p0000."""
    return f"d{device + 1:03d}.p{point:0{max(3, len(str(points - 1)))}d}"


async def serve_ua(ports: list[int], points: int) -> None:
    """One asyncua server listening on every port of ``ports``, R Doubles per device, until SIGTERM."""
    from asyncua import Server, ua
    from asyncua.server.binary_server_asyncio import BinaryServer

    logging.disable(logging.WARNING)  # asyncua logs every session and subscription at INFO
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{ports[0]}/plant/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = ua.Int16(await server.register_namespace(UA_NAMESPACE))
    devices: list[list[Any]] = []  # per device: the Value attribute of each variable
    space = server.iserver.aspace
    for d in range(len(ports)):
        device = await server.nodes.objects.add_object(ua.NodeId(ua.String(f"d{d + 1:03d}"), ns), f"d{d + 1:03d}")
        nodes = []
        for start in range(0, points, UA_FOLDER_SIZE):
            folder = await device.add_folder(ua.NodeId(ua.String(f"d{d + 1:03d}.f{start}"), ns), f"f{start}")
            for p in range(start, min(points, start + UA_FOLDER_SIZE)):
                name = ua_node(d, p, points)
                nodes.append(await folder.add_variable(ua.NodeId(ua.String(name), ns), name, 0.0))
        devices.append([space._nodes[n.nodeid].attributes[ua.AttributeIds.Value] for n in nodes])
    await server.start()
    listeners = []
    for port in ports[1:]:  # the same address space behind every other port
        listener = BinaryServer(server.iserver, "127.0.0.1", port, server.limits)
        listener.set_policies(server._policies)
        await listener.start()
        listeners.append(listener)
    stop = stop_on_sigterm()
    print("ready", flush=True)
    await every_change_period(stop, ua_changer(devices))
    for listener in listeners:
        await listener.stop()
    await server.stop()


def ua_changer(devices: list[list[Any]]) -> Any:
    """A ``change(tick)`` giving every variable a new Double with the tick's source time, a device at a time.

    100,000 changes a second through asyncua's own path (``Variant`` and ``DataValue`` type checks,
    then per monitored item an awaited ``datachange_callback`` that deep-copies the value, compares
    it with the last and enqueues a notification) take a whole core here. So the values are built
    without the dataclasses' checks, and for a plain monitored item (no filter, reporting) the
    notification is put in the subscription's queue directly, as that callback would for a value
    that changed. Anything else (a filter, a sampling-only item) goes through asyncua's callback.
    """
    import datetime as dt

    from asyncua import ua
    from asyncua.server.monitored_item_service import MonitoredItemService

    double, reporting, new = ua.VariantType.Double, ua.MonitoringMode.Reporting, object.__new__
    good, notification, variant_class = ua.StatusCode(), ua.MonitoredItemNotification, ua.Variant

    class SharedDataValue(ua.DataValue):
        """A DataValue nobody mutates after it is built, so every monitored item may share it."""

        __slots__ = ()

        def __deepcopy__(self, memo: dict[int, object]) -> SharedDataValue:
            return self

    def data_value(number: float, stamp: Any) -> SharedDataValue:
        variant = new(variant_class)
        variant.Value, variant.VariantType, variant.Dimensions, variant.is_array = number, double, None, False
        value = new(SharedDataValue)
        value.Encoding, value.Value, value.StatusCode = ua.Byte(0), variant, good
        value.SourceTimestamp, value.ServerTimestamp = stamp, None
        value.SourcePicoseconds, value.ServerPicoseconds = None, None
        return value

    fast_path = MonitoredItemService.datachange_callback
    # callback handle -> (its monitored item, item id, subscription), or None for asyncua's own path.
    # Handles only grow (asyncua counts them), and a deleted item's handle leaves the callbacks.
    targets: dict[int, tuple[Any, int, Any] | None] = {}

    def target(handle: int, callback: Any) -> tuple[Any, int, Any] | None:
        service = getattr(callback, "__self__", None)
        if not isinstance(service, MonitoredItemService) or callback.__func__ is not fast_path:
            return None
        mid = service._monitored_datachange[handle]
        item = service._monitored_items[mid]
        return None if item.filter else (item, mid, service.isub)

    async def change(tick: int) -> None:
        stamp = dt.datetime.now(dt.UTC)
        offset = (tick % 1000) * 0.01
        for d, attributes in enumerate(devices):
            base = 20.0 + d * len(attributes) * 0.5 + offset
            woken = set()
            for p, attribute in enumerate(attributes):
                value = data_value(base + p * 0.5, stamp)
                attribute.value = value
                for handle, callback in attribute.datachange_callbacks.items():
                    if handle not in targets:
                        targets[handle] = target(handle, callback)
                    found = targets[handle]
                    if found is None or found[0].mode is not reporting:
                        await callback(handle, value)
                        continue
                    item, mid, subscription = found
                    item.mvalue.old_dvalue, item.mvalue.current_dvalue = item.mvalue.current_dvalue, value
                    entry = notification(ClientHandle=item.client_handle, Value=value)
                    queue = subscription._triggered_datachanges
                    waiting = queue.get(mid)
                    if waiting is None:
                        queue[mid] = [entry]
                        woken.add(subscription)
                    elif item.queue_size == 1:
                        waiting[0] = entry
                    else:
                        if item.queue_size and len(waiting) >= item.queue_size:
                            waiting.pop(0)
                        waiting.append(entry)
            for subscription in woken:  # what enqueueing does for a new item: publish now if interval is 0
                await subscription._trigger_publish()
            await asyncio.sleep(0)  # one device's batch at a time: publish and requests run in between

    return change


# --------------------------------------------------------------------------- the subscriber


_TS = re.compile(rb'"ts":(-?[0-9][0-9.eE+-]*)')


def telemetry_ages(payload: bytes, now: float) -> tuple[int, list[tuple[float, int]]]:
    """(samples, [(age, samples of that age)]) of a telemetry payload, v1 or v2."""
    if payload.startswith(b'{"v":1,'):  # v1: one "ts" per sample (a regex: json.loads costs more)
        stamps = Counter(_TS.findall(payload))
        return sum(stamps.values()), [(now - float(ts), n) for ts, n in stamps.items()]
    doc = json.loads(payload)
    if "points" in doc:
        return len(doc["points"]), [(now - float(p["ts"]), 1) for p in doc["points"]]
    ages = [(now - float(r["ts"]), len(r.get("values", ()))) for r in doc.get("reads", ())]
    return sum(n for _, n in ages), ages


def subscribe(port: int, ca: Path, cert: Path, key: Path) -> None:
    """Count samples and their ages; on "window START END" (monotonic) on stdin, report that window."""
    from tests.mqtt_broker import tls_client

    lock = threading.Lock()
    # arrival (monotonic), samples, ages, the payload's head ('{"v":1,')
    records: list[tuple[float, int, list[tuple[float, int]], str]] = []
    ready = threading.Event()
    client = tls_client("bench-plant-subscriber", ca=ca, cert=cert, key=key)

    def on_connect(c: Any, *_: Any) -> None:
        c.subscribe(TOPIC, qos=1)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        now_mono, now_wall = time.monotonic(), time.time()
        samples, ages = telemetry_ages(msg.payload, now_wall)
        with lock:
            records.append((now_mono, samples, ages, msg.payload[:7].decode("ascii", "replace")))

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
            records.clear()  # every run asks once, after its window
        heads = Counter(r[3] for r in inside)
        ages: Counter[float] = Counter()
        for _, _, message_ages, _ in inside:
            for age, n in message_ages:
                ages[round(age, 4)] += n
        print(json.dumps({"samples": sum(r[1] for r in inside), "ages": sorted(ages.items()), "total": total,
                          "heads": heads}), flush=True)
    client.disconnect()
    client.loop_stop()


# --------------------------------------------------------------------------- one run


@dataclass
class Shape:
    devices: int
    points: int
    interval: float
    protocol: str = "modbus"
    mqtt: bool = True
    v2: bool = False
    text: str = ""
    inflight: bool = False

    @classmethod
    def parse(cls, text: str) -> Shape:
        match = re.fullmatch(r"(ua:)?(\d+)x(\d+)@(\d+(?:\.\d+)?)(ms|s)((?::twin|:v2|:inflight)*)", text)
        if not match:
            raise argparse.ArgumentTypeError(f"expected [ua:]DxR@INTERVAL[:twin][:v2][:inflight] like 20x125@100ms or "
                                             f"ua:4x2500@100ms:v2, got {text!r}")
        suffixes = match.group(6).split(":")[1:]
        if "twin" in suffixes and "v2" in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r}: ':v2' sets the MQTT payload, ':twin' runs without MQTT")
        devices, points = int(match.group(2)), int(match.group(3))
        if devices < 1 or points < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: at least one device and one point")
        if not match.group(1) and (devices > 247 or points > 32768):
            raise argparse.ArgumentTypeError(f"{text!r}: Modbus shapes take up to 247 devices (unit ids) and "
                                             "32768 float32 points (the register space)")
        interval = float(match.group(4)) * (0.001 if match.group(5) == "ms" else 1.0)
        if match.group(1) and "inflight" in suffixes:
            raise argparse.ArgumentTypeError(f"{text!r}: ':inflight' is for Modbus shapes")
        return cls(devices, points, interval, "opcua" if match.group(1) else "modbus", "twin" not in suffixes,
                   "v2" in suffixes, text, "inflight" in suffixes)

    @property
    def offered(self) -> float:
        return self.devices * self.points / self.interval


@dataclass(frozen=True)
class Version:
    """A version of edge-agent that the bench runs: a label, its python and how to make it import itself."""

    label: str
    python: str
    this: bool  # this checkout (first on PYTHONPATH) rather than a baseline venv

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if self.this:  # the venv's python may have another checkout installed (editable): this one wins
            env["PYTHONPATH"] = str(ROOT)
        return env

    def payload(self, shape: Shape) -> str:
        """The telemetry version this version runs for ``shape``, as the table shows it."""
        if not shape.mqtt:
            return "-"
        if not shape.v2:
            return "v1"
        return "v2" if self.this else "v1 (:v2 ignored)"


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
    server_cpu: float = 0.0
    heads: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def share(self) -> float:
        return self.rate / self.shape.offered

    @property
    def us_per_point(self) -> float:
        return 1e6 * self.cpu / self.delivered if self.delivered else float("nan")

    @property
    def server_share(self) -> float:
        return self.server_cpu / self.seconds if self.seconds else 0.0

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


def config_text(shape: Shape, version: Version, data_dir: Path, ports: list[int], broker_port: int | None,
                pki: Any) -> str:
    """The agent's config for ``shape``, as ``version`` takes it (telemetry v2 only for this checkout)."""
    lines = ["[agent]", f'id = "{GATEWAY}"', f'site = "{SITE}"', f"data_dir = {str(data_dir)!r}",
             'log_level = "warning"', ""]
    if broker_port is not None:
        lines += ["[mqtt]", 'host = "localhost"', f"port = {broker_port}", f"ca_file = {str(pki.ca_cert)!r}",
                  f"cert_file = {str(pki.agent_cert)!r}", f"key_file = {str(pki.agent_key)!r}"]
        if version.payload(shape) == "v2":
            lines.append("telemetry_version = 2")
        lines.append("")
    interval = f"{round(shape.interval * 1000)}ms"
    for d in range(shape.devices):
        if shape.protocol == "opcua":
            lines += opcua_device(d, shape.points, ports[d], interval)
        else:
            lines += modbus_device(d, shape.points, ports[0], interval, 4 if shape.inflight and version.this else 1)
    return "\n".join(lines)


def modbus_device(d: int, points: int, port: int, interval: str, in_flight: int = 1) -> list[str]:
    lines = ["[[devices]]", f'name = "d{d + 1:03d}"', 'protocol = "modbus"', 'host = "127.0.0.1"',
             f"port = {port}", f"unit_id = {d + 1}", f'interval = "{interval}"']
    if in_flight > 1:  # only this checkout: a baseline may not know the key
        lines.append(f"requests_in_flight = {in_flight}")
    lines.append("")
    for p in range(points):
        lines += ["  [[devices.points]]", f'  name = "d{d + 1:03d}.p{p:03d}"', f"  address = {2 * p}",
                  '  type = "float32"', ""]
    return lines


def opcua_device(d: int, points: int, port: int, interval: str) -> list[str]:
    # The same keys in 53f8bbe and since: endpoint, mode, security, interval (= publishing interval), node.
    lines = ["[[devices]]", f'name = "d{d + 1:03d}"', 'protocol = "opcua"',
             f'endpoint = "opc.tcp://127.0.0.1:{port}/plant/"', 'mode = "subscribe"', 'security = "None"',
             f'interval = "{interval}"', 'timeout = "10s"', ""]
    for p in range(points):
        name = ua_node(d, p, points)
        lines += ["  [[devices.points]]", f'  name = "{name}"', f'  node = "nsu={UA_NAMESPACE};s={name}"', ""]
    return lines


def check_config(version: Version, config: Path, cwd: Path) -> None:
    """``edge-agent check-config`` of ``version`` on ``config``; SystemExit with its words when refused."""
    done = subprocess.run([version.python, "-m", "edge_agent.cli", "check-config", "--config", str(config)],
                          cwd=cwd, env=version.env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{version.label} refuses the config for this shape ({config}):\n"
                         f"{(done.stdout + done.stderr).strip()}")


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

    def cpu(self) -> float:
        return process_cpu_seconds(self.process.pid) or 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_server(shape: Shape, work: Path) -> tuple[Child, list[int]]:
    """The simulated devices for ``shape`` in one child process on core 1, and their ports."""
    if shape.protocol == "opcua":
        ports = [free_port() for _ in range(shape.devices)]
        command = [sys.executable, __file__, "--serve-ua", str(shape.points), ",".join(map(str, ports))]
    else:
        ports = [free_port()]
        command = [sys.executable, __file__, "--serve", str(ports[0]), str(shape.devices), str(shape.points)]
    return Child(command, OTHERS_CPU, cwd=work), ports


def run_once(version: Version, shape: Shape, args: argparse.Namespace, pki: Any, broker_port: int | None,
             subscriber: Child | None, work: Path) -> Result:
    data_dir = work / f"data-{version.label.split()[0]}-{re.sub(r'[@:]', '_', shape.text)}-{time.monotonic_ns()}"
    data_dir.mkdir()
    server, ports = start_server(shape, work)
    config = data_dir / "agent.toml"
    config.write_text(config_text(shape, version, data_dir, ports, broker_port if shape.mqtt else None, pki))
    profile = data_dir / "agent.prof"
    launcher = ["-m", "cProfile", "-o", str(profile)] if args.profile else []
    # cwd outside any checkout, so the baseline imports its own edge_agent
    log = open(data_dir / "agent.log", "w")  # noqa: SIM115 - closed after the agent exits
    agent = subprocess.Popen([version.python, *launcher, "-m", "edge_agent.cli", "run", "--config", str(config)],
                             cwd=work, env=version.env(), stderr=log, preexec_fn=lambda: pin(AGENT_CPU))
    try:
        time.sleep(args.warmup)  # a warm-up, not a wait for a condition: the agent runs on its own
        if agent.poll() is not None:
            tail = (data_dir / "agent.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"{version.label}: the agent exited with {agent.returncode}; "
                             f"{data_dir / 'agent.log'} ends with:\n{tail}")
        rss0, _ = memory_mb(agent.pid)
        start_mono, start_cpu, start_server_cpu = time.monotonic(), process_cpu_seconds(agent.pid) or 0.0, server.cpu()
        rows0 = 0 if shape.mqtt else history_rows(data_dir / "twin.db")
        time.sleep(args.seconds)
        end_mono, end_cpu, end_server_cpu = time.monotonic(), process_cpu_seconds(agent.pid) or 0.0, server.cpu()
        rows1 = 0 if shape.mqtt else history_rows(data_dir / "twin.db")
        rss1, hwm = memory_mb(agent.pid)
        report = subscriber.ask(f"window {start_mono} {end_mono}") if shape.mqtt and subscriber else None
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60 if args.profile else 30)  # the profiler writes its file on the way out
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        log.close()
        server.stop()
    delivered = report["samples"] if report else rows1 - rows0
    ages = [(float(a), int(n)) for a, n in report["ages"]] if report else []
    result = Result(version.label, shape, end_mono - start_mono, end_cpu - start_cpu, delivered, ages, rss1, hwm,
                    rss1 - rss0, end_server_cpu - start_server_cpu, report["heads"] if report else {})
    if args.profile:
        print_profile(profile, shape)
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def print_profile(profile: Path, shape: Shape) -> None:
    import pstats

    if not profile.exists():
        print(f"\nno profile written to {profile} (the agent did not exit cleanly)")
        return
    print(f"\ncProfile of this checkout's agent, {shape.text}: top 30 functions by own time (tottime). cProfile "
          "sees the main thread only (not the twin writer's thread), and its overhead inflates every call: the "
          "CPU figures of a --profile run are not comparable with unprofiled runs.")
    pstats.Stats(str(profile), stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(30)


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


# --------------------------------------------------------------------------- the machine


_VERSIONS_SCRIPT = """
import json, sqlite3, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"
import edge_agent
print(json.dumps({"python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version,
                  "pymodbus": version("pymodbus"), "asyncua": version("asyncua"), "paho-mqtt": version("paho-mqtt"),
                  "edge_agent": edge_agent.__file__}))
"""


def print_env(versions: list[Version]) -> None:
    """The machine and, per version, the interpreter and libraries it runs with."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                          text=True).stdout.strip()
    mosquitto = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    print(f"machine: {model}; {os.cpu_count()} cores ({usable} usable); {platform.system()} {platform.release()}; "
          f"load average {load}")
    print(f"broker:  {mosquitto.strip() or 'mosquitto (version unknown)'}")
    for version in versions:
        done = subprocess.run([version.python, "-c", _VERSIONS_SCRIPT], capture_output=True, text=True,
                              env=version.env(), cwd=tempfile.gettempdir())
        try:
            info = json.loads(done.stdout)
        except json.JSONDecodeError:
            print(f"{version.label}: cannot read its versions: {done.stderr.strip()[-300:]}")
            continue
        where = f"{head}, {ROOT}" if version.this else version.python
        print(f"{version.label}: python {info['python']}, sqlite {info['sqlite']}, pymodbus {info['pymodbus']}, "
              f"asyncua {info['asyncua']}, paho-mqtt {info['paho-mqtt']} ({where}; edge_agent from "
              f"{Path(info['edge_agent']).parent})")


# --------------------------------------------------------------------------- orchestration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", type=Shape.parse, help="[ua:]DxR@INTERVAL[:twin][:v2][:inflight] "
                        f"(repeatable; default: {' '.join(SHAPES)}); 'ua:' for D OPC UA servers of R Doubles, "
                        "':twin' runs without [mqtt], ':v2' with telemetry_version = 2 (this checkout only)")
    parser.add_argument("--baseline", metavar="REF", help="also run a git ref of this repository, e.g. 53f8bbe")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before the window (default 8)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window (default 20)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per shape and version; medians are shown")
    parser.add_argument("--keep", action="store_true", help="keep each run's data folder (twin, outbox, log)")
    parser.add_argument("--profile", action="store_true", help="run this checkout's agent under cProfile (one "
                        "--shape, no --baseline) and print the top 30 functions by own time; CPU figures under "
                        "the profiler are not comparable")
    parser.add_argument("--env", action="store_true", help="print the machine (CPU, cores) and the python, sqlite, "
                        "pymodbus, asyncua and paho-mqtt versions first")
    parser.add_argument("--serve", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-ua", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--subscribe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile and (args.baseline or len(args.shape or SHAPES) != 1 or args.repeat != 1):
        parser.error("--profile runs one --shape of this checkout once (no --baseline, no --repeat)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve(*args.serve))
        return
    if args.serve_ua:
        asyncio.run(serve_ua([int(p) for p in args.serve_ua[1].split(",")], int(args.serve_ua[0])))
        return
    if args.subscribe:
        subscribe(int(args.subscribe[0]), *(Path(a) for a in args.subscribe[1:]))
        return
    shapes = args.shape or [Shape.parse(s) for s in SHAPES]
    versions = [Version("this (cProfile)" if args.profile else "this", sys.executable, True)]
    if args.baseline:
        python, commit = baseline_python(args.baseline)
        label = f"{args.baseline} ({commit[:7]})" if args.baseline != commit[:len(args.baseline)] else commit[:7]
        versions.insert(0, Version(label, python, False))
    print(f"command: {command_line()}")
    if args.env:
        print_env(versions)
    from tests.mqtt_broker import Broker, make_pki

    with tempfile.TemporaryDirectory(prefix="bench-plant-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        check_configs(shapes, versions, pki, work)
        pin(OTHERS_CPU)  # this orchestrator, the broker and the subscriber share core 1
        with Broker(pki, work / "broker") as broker:
            subscriber = Child([sys.executable, __file__, "--subscribe", str(broker.port), str(pki.ca_cert),
                                str(pki.operator_cert), str(pki.operator_key)], OTHERS_CPU, cwd=work, stdin=True)
            results: list[Result] = []
            try:
                for shape in shapes:
                    for _ in range(args.repeat):
                        order = versions if len(results) % 2 == 0 else versions[::-1]  # alternate against drift
                        for version in order:
                            progress(f"{shape.text}: {version.label} (telemetry {version.payload(shape)})")
                            results.append(run_once(version, shape, args, pki, broker.port, subscriber, work))
            finally:
                subscriber.stop()
    report(shapes, versions, results)


def check_configs(shapes: list[Shape], versions: list[Version], pki: Any, work: Path) -> None:
    """Every (version, shape) config through that version's check-config, before anything runs."""
    folder = work / "check"
    folder.mkdir()
    for shape in shapes:
        for version in versions:
            config = folder / f"{version.label.split()[0]}-{re.sub(r'[@:]', '_', shape.text)}.toml"
            ports = list(range(40000, 40000 + shape.devices))  # placeholders: nothing connects
            config.write_text(config_text(shape, version, folder, ports, 8883 if shape.mqtt else None, pki))
            try:
                check_config(version, config, work)
            except SystemExit as exc:
                if shape.v2 and version.this and "telemetry_version" in str(exc):
                    raise SystemExit(f"{exc}\n(':v2' needs a checkout with [mqtt] telemetry_version)") from None
                raise


def report(shapes: list[Shape], versions: list[Version], results: list[Result]) -> None:
    rows, warnings = [], []
    for shape in shapes:
        for version in versions:
            mine = [r for r in results if r.shape is shape and r.version == version.label]
            if not mine:
                continue

            def med(values: list[float]) -> float:
                return statistics.median(values)

            delivered = "" if not shape.mqtt else f"{100 * med([r.share for r in mine]):.1f} %"
            ages = "" if not shape.mqtt else (f"{med([r.age(0.5) for r in mine]):.2f} / "
                                              f"{med([r.age(0.99) for r in mine]):.2f}")
            server = med([r.server_share for r in mine])
            rows.append([shape.text, version.label, version.payload(shape), f"{shape.offered:,.0f}", delivered,
                         f"{med([r.us_per_point for r in mine]):.2f}", ages,
                         f"{med([r.rss_mb for r in mine]):.0f} ({med([r.hwm_mb for r in mine]):.0f})",
                         f"{med([r.rss_growth_mb for r in mine]):+.1f}", f"{100 * server:.0f} %"])
            if server > SATURATED:
                warnings.append(f"{shape.text}, {version.label}: the device server used {100 * server:.0f} % of "
                                "its core: it, not the agent, may limit delivered")
            expected = {"v2": '{"v":2,'}.get(version.payload(shape), '{"v":1,')
            odd = {h for r in mine for h in r.heads if h != expected}
            if shape.mqtt and odd:
                warnings.append(f"{shape.text}, {version.label}: telemetry payloads starting {sorted(odd)} "
                                f"(expected {expected})")
    print_table("plant shapes (D devices x R points @ interval; agent pinned to one core; 'ua:' OPC UA Doubles, "
                "else Modbus float32)",
                ["shape", "version", "telemetry", "offered/s", "delivered", "CPU us/point", "age p50/p99 s",
                 "RSS MB (peak)", "RSS growth MB", "server CPU"], rows)
    for warning in warnings:
        print(f"WARNING: {warning}")
    if any(v.this for v in versions) and any(v.label.endswith("(cProfile)") for v in versions):
        print("NOTE: this checkout ran under cProfile: its CPU us/point is inflated by the profiler and not "
              "comparable with unprofiled runs.")
    if len(versions) == 2:
        ratios = []
        for shape in shapes:
            base = [r.us_per_point for r in results if r.shape is shape and r.version == versions[0].label]
            this = [r.us_per_point for r in results if r.shape is shape and r.version == versions[1].label]
            if base and this:
                ratio = statistics.median(base) / statistics.median(this)
                ratios.append([shape.text, versions[0].payload(shape), versions[1].payload(shape),
                               f"{statistics.median(base):.2f}", f"{statistics.median(this):.2f}", f"{ratio:.2f}x"])
        print_table(f"CPU per point: {versions[0].label} / this checkout (higher = this checkout is cheaper)",
                    ["shape", "baseline telemetry", "this telemetry", "baseline us", "this us", "ratio"], ratios)


if __name__ == "__main__":
    main()
