"""Benchmark: write latency through the safety gate, idle and while the agent carries a load.

For the agent exactly as it runs in production (config text -> ``config.loads`` -> ``Agent.start``),
``--writes`` operator writes per protocol go through ``SafetyGate.request`` one after the other,
alternating between a Modbus TCP holding register (uint16) and an OPC UA Double node, each a new
value. For every write two latencies are taken:

- **request -> written**: from ``gate.request`` to the return of the driver's ``write`` (the gate's
  checks, the exact value from the driver, the protocol round trip that sets the value);
- **request -> read back**: to the first read-back (the gate's own ``read()`` of the device) that
  reports the new value;
- **request -> confirmed**: from ``gate.request`` to the gate's ``applied`` verdict: the read-back
  saw the value and still saw it after the settle time (up to 1 s, ``min(readback_timeout / 2, 1 s)``,
  against controllers that revert a rejected setpoint on their next scan).

Two phases in one run, so the loaded figures can be read as a ratio to the idle ones on the same
machine at the same time: **idle** (only the two write targets configured) and **loaded** (plus
``--load-devices`` Modbus devices of ``--load-points`` float32 points polled every
``--load-interval``: 25,000 points/s by default, stored in the twin). The simulated devices and
the write targets run in a child process (this script with ``--serve``), so their CPU is not the
agent's. The write latency is taken with a driver factory that wraps the real driver classes (our
own interface, as the tests do); nothing is mocked.

Run ``python bench/bench_gate.py --help``; docs/benchmarks.md has the figures and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import command_line, free_port, print_table

from drivers import driver_class
from drivers.base import Driver
from edge_agent.config import AgentConfig, DeviceConfig, loads
from edge_agent.config.table import parse_duration

UNIT = 1
NAMESPACE = "urn:edge-agent:bench-gate"
MODBUS_SP, OPCUA_SP = "wmod.sp", "wopc.sp"


# --------------------------------------------------------------------------- simulated devices (child process)


async def serve(load_ports: list[int], points: int, write_port: int, opcua_port: int) -> None:
    """The load devices, a Modbus write target and an OPC UA write target, until SIGTERM."""
    # Imported here so the agent process never loads the servers' side (RSS).
    from asyncua import Server, ua
    from bench_modbus import register_values
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.disable(logging.WARNING)  # asyncua logs sessions at INFO; pymodbus disconnects at shutdown
    values = register_values(points)
    servers: list[ModbusTcpServer] = []
    for port in load_ports:
        device = SimDevice(id=UNIT, simdata=[SimData(0, values=values, datatype=DataType.REGISTERS)])
        servers.append(ModbusTcpServer(device, address=("127.0.0.1", port)))
    target = SimDevice(id=UNIT, simdata=[SimData(0, count=8, values=1000, datatype=DataType.REGISTERS)])
    servers.append(ModbusTcpServer(target, address=("127.0.0.1", write_port)))
    for server in servers:
        await server.serve_forever(background=True)
    opcua = Server()
    await opcua.init()
    opcua.disable_clock()
    opcua.set_endpoint(f"opc.tcp://127.0.0.1:{opcua_port}/bench-gate/")
    opcua.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await opcua.register_namespace(NAMESPACE)
    folder = await opcua.nodes.objects.add_object(ua.NodeId("Bench", ns), "Bench")
    node = await folder.add_variable(ua.NodeId("Setpoint", ns), "Setpoint", ua.Variant(1000.0, ua.VariantType.Double))
    await node.set_writable()
    await opcua.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)  # nobody reads our stdout past "ready"
    os.dup2(devnull, sys.stdout.fileno())
    await stop.wait()
    await opcua.stop()
    for server in servers:
        await server.shutdown()


def start_servers(load_ports: list[int], points: int, write_port: int, opcua_port: int) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "--serve", "--load-points", str(points), "--ports",
               ",".join(map(str, load_ports)), "--write-ports", f"{write_port},{opcua_port}"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise SystemExit(f"simulated devices did not start (got {line!r}, exit {child.wait()})")
    return child


# --------------------------------------------------------------------------- the agent's config


def config_text(load_ports: list[int], points: int, interval: str, write_port: int, opcua_port: int,
                data_dir: Path) -> str:
    """The two write targets (polled Modbus register, subscribed OPC UA node) and the load devices."""
    lines = ["[agent]", 'id = "bench"', 'site = "bench"', f"data_dir = {str(data_dir)!r}", 'log_level = "warning"',
             "", "[twin]", 'history_retention = "7d"', "",
             "[[devices]]", 'name = "wmod"', 'protocol = "modbus"', 'host = "127.0.0.1"', f"port = {write_port}",
             f"unit_id = {UNIT}", 'interval = "200ms"', "",
             "  [[devices.points]]", f'  name = "{MODBUS_SP}"', "  address = 0", '  type = "uint16"',
             "  writable = true", "  min = 0", "  max = 60000", "",
             "[[devices]]", 'name = "wopc"', 'protocol = "opcua"',
             f'endpoint = "opc.tcp://127.0.0.1:{opcua_port}/bench-gate/"', 'mode = "subscribe"', 'interval = "200ms"',
             "",
             "  [[devices.points]]", f'  name = "{OPCUA_SP}"', f'  node = "nsu={NAMESPACE};s=Setpoint"',
             "  writable = true", "  min = 0", "  max = 60000", ""]
    for d, port in enumerate(load_ports):
        lines += ["[[devices]]", f'name = "load{d:03d}"', 'protocol = "modbus"', 'host = "127.0.0.1"',
                  f"port = {port}", f"unit_id = {UNIT}", f'interval = "{interval}"', ""]
        for p in range(points):
            lines += ["  [[devices.points]]", f'  name = "load{d:03d}.p{p:05d}"', f"  address = {2 * p}",
                      '  type = "float32"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurements


@dataclass
class Latencies:
    """Seconds from request to written and to confirmed, per write, for one protocol in one phase."""

    written: list[float] = field(default_factory=list)
    read_back: list[float] = field(default_factory=list)
    confirmed: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class WriteClock:
    """A driver factory: the registered driver classes, subclassed to note when each write returned and
    when a read first reported the value written."""

    def __init__(self) -> None:
        self.returned: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.expected: dict[str, Any] = {}

    def factory(self, device: DeviceConfig, data_dir: Path) -> Driver:
        base = driver_class(device.protocol)
        clock = self

        class Timed(base):  # type: ignore[valid-type, misc]
            async def write(self, point: str, value: Any) -> None:
                clock.seen.pop(point, None)
                clock.expected[point] = value
                await super().write(point, value)
                clock.returned[point] = time.perf_counter()

            async def read(self) -> Any:
                readings = await super().read()
                now = time.perf_counter()
                for r in readings:
                    if r.point in clock.expected and r.point not in clock.seen and r.value == clock.expected[r.point]:
                        clock.seen[r.point] = now
                return readings

        return Timed(device, data_dir)


async def phase(config: AgentConfig, writes: int, warmup: float) -> tuple[dict[str, Latencies], dict[str, float]]:
    """Start the agent, warm up, make the writes, stop; latencies per point and the load carried."""
    from edge_agent.agent import Agent

    clock = WriteClock()
    agent = Agent(config, driver_factory=clock.factory)
    await agent.start()
    try:
        deadline = time.monotonic() + 30
        while not all(p in agent.latest and agent.latest[p].quality == "good" for p in (MODBUS_SP, OPCUA_SP)):
            if time.monotonic() > deadline:
                raise SystemExit("the write targets never read good: are the simulated devices up?")
            await asyncio.sleep(0.1)
        await asyncio.sleep(warmup)
        stored, began = agent.stored, time.perf_counter()
        results = {MODBUS_SP: Latencies(), OPCUA_SP: Latencies()}
        for i in range(writes):
            for point in (MODBUS_SP, OPCUA_SP):
                value = 2000 + (i % 2) * 100 + i  # a new value every time
                asked = time.perf_counter()
                verdict = await agent.gate.request(point, value, source="operator", actor="bench")
                done = time.perf_counter()
                if verdict.result != "applied":
                    results[point].failures.append(f"{verdict.result}: {verdict.reason}")
                    continue
                results[point].written.append(clock.returned[point] - asked)
                results[point].read_back.append(clock.seen[point] - asked)
                results[point].confirmed.append(done - asked)
        seconds = time.perf_counter() - began
        load = {"points_per_s": (agent.stored - stored) / seconds, "seconds": seconds,
                "overrides": float(len(agent.status().overrides))}
    finally:
        await agent.stop()
    return results, load


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (p99 of 40 samples is the largest but one... or the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, idle: dict[str, Latencies], loaded: dict[str, Latencies],
           load: dict[str, float], offered: float) -> None:
    print(f"\ncommand: {command_line()}")
    print(f"setup:   {args.writes} writes per protocol per phase, alternating Modbus (uint16 holding register, "
          f"polled) and OPC UA (Double node, subscribed); load {args.load_devices} Modbus devices x "
          f"{args.load_points} float32 points every {args.load_interval} = {offered:,.0f} points/s offered")
    print(f"loaded phase: {load['points_per_s']:,.0f} points/s stored in the twin while writing "
          f"({load['seconds']:.0f} s)")
    rows = []
    for name, point in (("OPC UA", OPCUA_SP), ("Modbus", MODBUS_SP)):
        for what in ("written", "read_back", "confirmed"):
            a, b = getattr(idle[point], what), getattr(loaded[point], what)
            if not a or not b:
                continue
            rows.append([f"{name}: request -> {what.replace('_', ' ')}",
                         f"{1e3 * statistics.median(a):.1f} / {1e3 * percentile(a, 0.99):.1f}",
                         f"{1e3 * statistics.median(b):.1f} / {1e3 * percentile(b, 0.99):.1f}",
                         f"{1e3 * statistics.fmean(b):.1f}",
                         f"{statistics.median(b) / statistics.median(a):.2f}"])
    print_table("latency in ms, p50 / p99 (nearest rank)",
                ["write", "idle", f"loaded ({offered:,.0f} points/s)", "loaded mean", "p50 ratio"], rows)
    problems = [f"{phase_name} {point}: {len(lat.failures)} writes not applied ({lat.failures[0]})"
                for phase_name, results in (("idle", idle), ("loaded", loaded))
                for point, lat in results.items() if lat.failures]
    if load["points_per_s"] < 0.95 * offered:
        problems.append(f"the agent stored {load['points_per_s']:,.0f} of {offered:,.0f} offered points/s")
    if load["overrides"]:
        problems.append("the gate took its own writes for operator overrides")
    for problem in problems:
        print(f"WARNING: {problem}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--writes", type=int, default=30, help="writes per protocol in each phase")
    parser.add_argument("--load-devices", type=int, default=5, help="Modbus devices carrying the load")
    parser.add_argument("--load-points", type=int, default=1000, help="float32 points per load device")
    parser.add_argument("--load-interval", default="200ms", help="poll interval of the load devices")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds the agent runs before the writes")
    parser.add_argument("--data-dir", type=Path, help="where the twins go (default: a temporary folder, removed)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--write-ports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.load_points <= 32_767:
        parser.error("--load-points: 1..32767 (two registers each)")
    try:
        parse_duration(args.load_interval)
    except ValueError:
        parser.error(f'--load-interval: expected a duration like "200ms", got "{args.load_interval}"')
    return args


async def bench(args: argparse.Namespace, data_dir: Path) -> None:
    load_ports = [free_port() for _ in range(args.load_devices)]
    write_port, opcua_port = free_port(), free_port()
    server = start_servers(load_ports, args.load_points, write_port, opcua_port)
    offered = args.load_devices * args.load_points / parse_duration(args.load_interval)
    try:
        results = []
        for name, ports in (("idle", []), ("loaded", load_ports)):
            folder = data_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            text = config_text(ports, args.load_points, args.load_interval, write_port, opcua_port, folder)
            config = loads(text, folder / "bench.toml")
            progress(f"{name}: {len(config.devices)} devices, {args.writes} writes per protocol")
            results.append(await phase(config, args.writes, args.warmup))
    finally:
        server.terminate()
        server.wait()
    (idle, _), (loaded, load) = results
    report(args, idle, loaded, load, offered)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        write_port, opcua_port = (int(p) for p in args.write_ports.split(","))
        load_ports = [int(p) for p in args.ports.split(",") if p]
        asyncio.run(serve(load_ports, args.load_points, write_port, opcua_port))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(bench(args, args.data_dir.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
