"""Benchmark: Modbus TCP float32 points from simulated devices into the twin.

Measures, for the agent exactly as it runs in production (config text -> ``config.loads`` ->
``Agent.start``), after a warm-up and over a measuring window only:

- points per second stored in the twin's history (``Agent.stored``, checked against
  ``SELECT count(*) FROM history`` at the end);
- CPU time per point in microseconds (user + sys of this process, all threads);
- peak RSS (ru_maxrss) of this process, taken before the breakdown runs.

The simulated devices are pymodbus servers in a child process (this script with ``--serve``),
one port per device, so their CPU is not counted; their CPU is reported beside the agent's to
show whether they kept up. After the agent run, the same process measures where the time goes:
(a) the Modbus driver's ``read()`` alone, polled on the same schedule, and (b)
``Twin.write_batch`` alone on as many readings, in flush-sized batches, on the same twin file.

Run ``python bench/bench_modbus.py --help``; bench/README.md has the figures and commands.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Window, command_line, free_port, peak_rss_mb, print_table, sample

from drivers.base import Reading
from edge_agent.config import AgentConfig, ModbusDevice, loads
from edge_agent.config.table import parse_duration

# Targets from issue 2 ("Done when"): a Python agent ahead of the fastest C gateway's figures.
TARGET_US_PER_POINT = 5.0
TARGET_POINTS_PER_S = 100_000
TARGET_RSS_MB = 60.0

UNIT = 1
# A server process using more than this share of its core is probably what limits the rate.
SERVER_SATURATED = 0.9


# --------------------------------------------------------------------------- simulated devices


def register_values(points: int) -> list[int]:
    """Holding registers 0..2*points-1: float32 values i * 0.25, big-endian word order."""
    data = struct.pack(f">{points}f", *(i * 0.25 for i in range(points)))
    return list(struct.unpack(f">{2 * points}H", data))


async def serve(ports: list[int], points: int) -> None:
    """Run one pymodbus TCP server per port until SIGTERM; print "ready" once all listen."""
    # Imported here so the agent process never loads pymodbus's server side (RSS).
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # disconnects at shutdown are expected
    values = register_values(points)
    servers = []
    for port in ports:
        device = SimDevice(id=UNIT, simdata=[SimData(0, values=values, datatype=DataType.REGISTERS)])
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        servers.append(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    # Nobody reads our stdout past "ready": a full pipe would stall the devices. pymodbus
    # prints frame dumps there when a client drops mid-request, so send it all to /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    await stop.wait()
    for server in servers:
        await server.shutdown()


def start_servers(ports: list[int], points: int) -> subprocess.Popen[str]:
    """The simulated devices in a child process; returns once they all listen."""
    command = [sys.executable, __file__, "--serve", "--points", str(points),
               "--ports", ",".join(map(str, ports))]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise SystemExit(f"simulated devices did not start (got {line!r}, exit {child.wait()})")
    return child


# --------------------------------------------------------------------------- the agent's config


def config_text(ports: list[int], points: int, interval: str, data_dir: Path) -> str:
    """One Modbus TCP device per port, ``points`` float32 points at contiguous addresses."""
    lines = ["[agent]", 'id = "bench"', 'site = "bench"', f"data_dir = {str(data_dir)!r}",
             'log_level = "warning"', "", "[twin]", 'history_retention = "7d"', ""]
    for d, port in enumerate(ports):
        lines += ["[[devices]]", f'name = "dev{d:03d}"', 'protocol = "modbus"', 'host = "127.0.0.1"',
                  f"port = {port}", f"unit_id = {UNIT}", f'interval = "{interval}"', ""]
        for p in range(points):
            lines += ["  [[devices.points]]", f'  name = "dev{d:03d}.p{p:05d}"', f"  address = {2 * p}",
                      '  type = "float32"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurements


async def measure_agent(config: AgentConfig, warmup: float, seconds: float, server_pid: int,
                        max_rss_mb: float) -> dict[str, object]:
    """Run the agent; measure stored points, CPU and reads over the window after the warm-up."""
    from edge_agent.agent import Agent

    agent = Agent(config)
    await agent.start()
    progress(f"agent started; warm-up {warmup:g} s")

    def reads() -> int:
        return sum(runner.status.reads for runner in agent.runners.values())

    await asyncio.sleep(warmup)
    start, reads_start = sample(agent.stored, server_pid), reads()
    progress(f"measuring for {seconds:g} s")
    deadline, aborted = time.monotonic() + seconds, False
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.5))
        # Readings waiting for the twin are held in memory: an agent that falls behind grows
        # without bound, and stopping it would then flush gigabytes. Stop early instead.
        if peak_rss_mb() > max_rss_mb:
            aborted = True
            progress(f"peak RSS passed {max_rss_mb:g} MB: the agent is falling behind; stopping early")
            break
    end, reads_end = sample(agent.stored, server_pid), reads()
    progress("stopping the agent")
    await agent.stop()
    down = [r.device.name for r in agent.runners.values() if r.status.state != "up"]
    return {"window": Window.between(start, end), "reads": reads_end - reads_start, "total": agent.stored,
            "flush_errors": agent.writer.flush_errors if agent.writer else 0, "down": down, "rss": peak_rss_mb(),
            "aborted": aborted}


async def measure_reads(config: AgentConfig, seconds: float, server_pid: int) -> tuple[Window, list[list[Reading]]]:
    """(a) ModbusDriver.read() alone, each device polled on its interval; returns the last readings."""
    from drivers.modbus import ModbusDriver

    devices = [d for d in config.devices if isinstance(d, ModbusDevice)]
    drivers = [ModbusDriver(d, config.agent.data_dir) for d in devices]
    for driver in drivers:
        await driver.connect()
    counted = [0]
    last: list[list[Reading]] = [[] for _ in drivers]

    async def poll(index: int, driver: ModbusDriver, interval: float, until: float) -> None:
        next_at = time.monotonic()
        while next_at < until:
            last[index] = await driver.read()
            counted[0] += len(last[index])
            next_at = max(next_at + interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    await asyncio.sleep(0)
    start = sample(0, server_pid)
    until = time.monotonic() + seconds
    await asyncio.gather(*(poll(i, drv, dev.interval, until) for i, (drv, dev) in enumerate(zip(drivers, devices,
                                                                                            strict=True))))
    end = sample(counted[0], server_pid)
    for driver in drivers:
        await driver.close()
    return Window.between(start, end), last


def measure_writes(config: AgentConfig, readings: list[list[Reading]], total: int) -> Window:
    """(b) Twin.write_batch alone: ``total`` readings in batches shaped like the agent's flushes."""
    from edge_agent.store.twin import Twin

    interval = min(d.interval for d in config.devices)
    reads_per_flush = max(1, round(config.twin.flush_interval / interval))
    twin = Twin.open(config.twin_path)
    try:
        twin.sync_points(config)
        now = time.time()
        batch = [(now, r) for _ in range(reads_per_flush) for r in readings if r]
        if not batch:
            raise SystemExit("breakdown (a) read nothing: are the simulated devices up?")
        start, stored = sample(0), 0
        while stored < total:
            stored += len(twin.write_batch(batch))
        end = sample(stored)
    finally:
        twin.close()
    return Window.between(start, end)


def progress(message: str) -> None:
    """A line on stderr so a long run shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def history_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM history").fetchone()[0])


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, config: AgentConfig, agent: dict[str, object], reads: Window,
           writes: Window, history: int) -> None:
    window = agent["window"]
    assert isinstance(window, Window)
    devices, points = len(config.devices), args.points
    interval = parse_duration(args.interval)
    offered = devices * points / interval
    expected_reads = devices * window.seconds / interval
    server = window.other_share

    print(f"\ncommand: {command_line()}")
    print(f"setup:   {devices} devices x {points} float32 points, interval {args.interval} "
          f"(offered {offered:,.0f} points/s), {-(-points * 2 // 125)} requests per device read, "
          f"warm-up {args.warmup:g} s, window {window.seconds:.1f} s")
    print_table("agent (the whole process: event loop, drivers, twin writer thread)",
                ["figure", "measured", "target"], [
                    ["points/s stored", f"{window.rate:,.0f}", f">= {TARGET_POINTS_PER_S:,}"],
                    ["CPU us/point", f"{window.us_per_item:.2f}", f"<= {TARGET_US_PER_POINT:g}"],
                    ["CPU, share of one core", f"{window.cpu_share:.0%}", ""],
                    ["peak RSS MB", f"{agent['rss']:.1f}", f"<= {TARGET_RSS_MB:g} (no model)"],
                    ["device reads done / due", f"{agent['reads']:,} / {expected_reads:,.0f}", ""],
                    ["server CPU, share of its core", f"{server:.0%}" if server is not None else "n/a",
                     f"< {SERVER_SATURATED:.0%}"],
                ])
    rest = window.us_per_item - reads.us_per_item - writes.us_per_item
    print_table("breakdown (same run, same process, same points)", ["part", "CPU us/point", "points", "share"], [
        ["(a) driver read() only", f"{reads.us_per_item:.2f}", f"{reads.count:,}",
         f"{reads.us_per_item / window.us_per_item:.0%}"],
        ["(b) Twin.write_batch only", f"{writes.us_per_item:.2f}", f"{writes.count:,}",
         f"{writes.us_per_item / window.us_per_item:.0%}"],
        ["agent - (a) - (b): submit, scheduling, threads", f"{rest:.2f}", "", f"{rest / window.us_per_item:.0%}"],
    ])
    print(f"\ncheck: agent.stored {agent['total']:,} (whole run), history rows {history:,}"
          f"{'' if agent['total'] == history else '  MISMATCH'}")
    problems = []
    if agent["aborted"]:
        problems.append(f"stopped early: peak RSS passed --max-rss {args.max_rss:g} MB (readings piling up)")
    if agent["down"]:
        problems.append(f"devices not up at the end: {', '.join(map(str, agent['down']))}")
    if agent["flush_errors"]:
        problems.append(f"{agent['flush_errors']} failed flushes")
    if server is not None and server > SERVER_SATURATED:
        problems.append(f"the server process used {server:.0%} of a core: it may be what limits points/s; "
                        "use fewer devices or a longer interval")
    if window.rate < 0.95 * offered:
        problems.append(f"stored {window.rate:,.0f} of {offered:,.0f} offered points/s: the agent "
                        "(or the server) fell behind")
    for problem in problems:
        print(f"WARNING: {problem}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--devices", type=int, default=10, help="simulated devices (one TCP port each)")
    parser.add_argument("--points", type=int, default=2000, help="float32 points per device")
    parser.add_argument("--interval", default="200ms", help="poll interval of every device")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds run before the window opens")
    parser.add_argument("--breakdown-seconds", type=float, default=5.0,
                        help="how long (a) polls the devices with the driver alone")
    parser.add_argument("--max-rss", type=float, default=1000.0,
                        help="MB of peak RSS at which the run stops early (the agent fell behind)")
    parser.add_argument("--data-dir", type=Path, help="where the twin goes (default: a temporary folder, removed)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.points <= 32_767:
        parser.error("--points: 1..32767 (two registers each)")
    try:
        parse_duration(args.interval)
    except ValueError:
        parser.error(f'--interval: expected a duration like "200ms" or "1s", got "{args.interval}"')
    return args


async def bench(args: argparse.Namespace, data_dir: Path) -> None:
    ports = [free_port() for _ in range(args.devices)]
    server = start_servers(ports, args.points)
    try:
        config = loads(config_text(ports, args.points, args.interval, data_dir), data_dir / "bench.toml")
        agent = await measure_agent(config, args.warmup, args.seconds, server.pid, args.max_rss)
        history = history_rows(config.twin_path)
        progress(f"breakdown (a): driver reads alone for {args.breakdown_seconds:g} s")
        reads, last = await measure_reads(config, args.breakdown_seconds, server.pid)
        progress(f"breakdown (b): Twin.write_batch alone, {reads.count:,} readings")
        writes = measure_writes(config, last, reads.count)
    finally:
        server.terminate()
        server.wait()
    report(args, config, agent, reads, writes, history)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        asyncio.run(serve([int(p) for p in args.ports.split(",")], args.points))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(bench(args, args.data_dir.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="bench-modbus-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
