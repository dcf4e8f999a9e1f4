"""Benchmark: OPC UA subscribed points from simulated devices into the twin.

Measures, for the agent exactly as it runs in production (config text -> ``config.loads`` ->
``Agent.start``, one ``opcua`` device per server in subscribe mode), after a warm-up and over a
measuring window only:

- points per second stored in the twin's history (``Agent.stored``, checked against
  ``SELECT count(*) FROM history`` at the end);
- CPU time per point in microseconds (user + sys of this process, all threads);
- peak RSS (ru_maxrss) of this process.

The simulated devices are asyncua servers, each in its own child process (this script with
``--serve PORT VARS HZ``), so their CPU is not counted against the agent; it is reported beside
the agent's, with the whole machine's, to show whether they kept up. Each server holds VARS
Double variables and gives every one a new value (with a source timestamp) HZ times a second.
The agent's publishing interval matches 1/HZ by default, so every change can become one
notification: points offered per second = servers x vars x hz. The servers count the changes
they really made; the report shows that beside what the agent stored.

asyncua's server is the expensive side (it encodes every notification in Python), so the
servers change their values straight in the address space (``AddressSpace`` attribute plus its
data-change callbacks, what ``write_attribute_value`` does minus per-call lookups and type
checks) to produce as many notifications per core as asyncua allows. On a small machine the
servers, not the agent, limit points/s; the agent's CPU per point is the robust figure.

Run ``python bench/bench_opcua.py --help``; bench/README.md has the figures and commands.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from common import Sample, Window, command_line, free_port, peak_rss_mb, print_table, process_cpu_seconds, sample

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, loads
from edge_agent.errors import ConfigError

# Targets from issue 2 ("Done when"): a Python agent ahead of the fastest C gateway's figures.
TARGET_US_PER_POINT = 25.0
TARGET_POINTS_PER_S = 30_000
TARGET_RSS_MB = 60.0

NAMESPACE = "urn:edge-agent:bench"
# A process using more than this share of its core is probably what limits the rate.
SATURATED = 0.9


# --------------------------------------------------------------------------- simulated devices


def node_name(index: int) -> str:
    return f"v{index:05d}"


async def serve(port: int, variables: int, hz: float, counter: Path) -> None:
    """One asyncua server with ``variables`` Doubles changing ``hz`` times a second, until SIGTERM.

    The number of value changes made so far is kept in ``counter`` (8 bytes, native order) so
    the bench can tell what the server generated from what the agent stored.
    """
    # Imported here so the agent process never loads asyncua's server side (RSS).
    from asyncua import Server, ua

    logging.disable(logging.WARNING)  # asyncua logs every session and subscription at INFO
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace(NAMESPACE)
    index = ua.Int16(ns)
    folder = await server.nodes.objects.add_object(ua.NodeId(ua.String("Bench"), index), "Bench")
    nodes = [await folder.add_variable(ua.NodeId(ua.String(node_name(i)), index), node_name(i), 0.0)
             for i in range(variables)]
    # The Value attribute of every variable, held once: a change is then an assignment and
    # the data-change callbacks (the subscriptions' monitored items), nothing else.
    space = server.iserver.aspace
    values = [space._nodes[n.nodeid].attributes[ua.AttributeIds.Value] for n in nodes]
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    fd = os.open(counter, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.pwrite(fd, struct.pack("=q", 0), 0)
    print("ready", flush=True)
    try:
        await change_values(values, hz, stop, fd)
    finally:
        os.close(fd)
    await server.stop()


async def change_values(values: list[Any], hz: float, stop: asyncio.Event, fd: int) -> None:
    """Give every variable a new value ``hz`` times a second; late ticks are skipped."""
    from asyncua import ua

    class SharedDataValue(ua.DataValue):
        """A DataValue nobody mutates, so copies of it may share it.

        asyncua's server deep-copies the DataValue of every change for every monitored item
        (``MonitoredItemValues.set_current_datavalue``), which costs more than anything else it
        does per notification. These values are never changed after creation; on the wire they
        are plain DataValues.
        """

        __slots__ = ()

        def __deepcopy__(self, memo: dict[int, object]) -> SharedDataValue:
            return self

    period, tick, next_at = 1.0 / hz, 0, time.monotonic()
    double, variant, data_value = ua.VariantType.Double, ua.Variant, SharedDataValue
    while not stop.is_set():
        tick += 1
        stamp = cast("ua.DateTime", dt.datetime.now(dt.UTC))  # a datetime is what the encoder takes
        for i, attribute in enumerate(values):
            value = data_value(variant(tick + i * 1e-3, double), SourceTimestamp=stamp)
            attribute.value = value
            for handle, callback in attribute.datachange_callbacks.items():
                await callback(handle, value)
        os.pwrite(fd, struct.pack("=q", tick * len(values)), 0)
        # A late tick is skipped, not caught up: two changes of a variable in one publishing
        # interval would reach the agent as one (queue size 1), and "made" would overstate
        # what could be delivered. The counter shows what was really made.
        next_at = max(next_at + period, time.monotonic())
        await asyncio.sleep(next_at - time.monotonic())


@dataclass(slots=True)
class ServerProcess:
    """A simulated device: its port, its process and the file where it counts its value changes."""

    port: int
    process: subprocess.Popen[str]
    counter: Path

    def cpu(self) -> float:
        return process_cpu_seconds(self.process.pid) or 0.0

    def changes(self) -> int:
        with open(self.counter, "rb") as file:
            return int(struct.unpack("=q", file.read(8))[0])


def start_servers(count: int, variables: int, hz: float, folder: Path) -> list[ServerProcess]:
    """The simulated devices, one child process each; returns once they all listen."""
    servers = []
    try:
        for _ in range(count):
            port = free_port()
            counter = folder / f"server-{port}.count"
            child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(variables), str(hz),
                                      str(counter)], stdout=subprocess.PIPE, text=True)
            servers.append(ServerProcess(port, child, counter))
        for server in servers:
            assert server.process.stdout is not None
            line = server.process.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"simulated device on port {server.port} did not start "
                                 f"(got {line!r}, exit {server.process.poll()})")
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: list[ServerProcess]) -> None:
    for server in servers:
        if server.process.poll() is None:
            server.process.terminate()
    for server in servers:
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


# --------------------------------------------------------------------------- the agent's config


def config_text(ports: list[int], variables: int, interval: str, data_dir: Path) -> str:
    """One OPC UA device per server in subscribe mode, one point per variable."""
    lines = ["[agent]", 'id = "bench"', 'site = "bench"', f"data_dir = {str(data_dir)!r}",
             'log_level = "warning"', "", "[twin]", 'history_retention = "7d"', ""]
    for d, port in enumerate(ports):
        lines += ["[[devices]]", f'name = "dev{d:03d}"', 'protocol = "opcua"',
                  f'endpoint = "opc.tcp://127.0.0.1:{port}/bench/"', 'mode = "subscribe"',
                  f'interval = "{interval}"', 'timeout = "10s"', ""]
        for v in range(variables):
            lines += ["  [[devices.points]]", f'  name = "dev{d:03d}.{node_name(v)}"',
                      f'  node = "nsu={NAMESPACE};s={node_name(v)}"', ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- measurements


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat; (0, 0) without it."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except OSError:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


@dataclass(slots=True)
class Result:
    window: Window
    servers_cpu: list[float]
    changes_per_s: float
    machine_busy: float
    total: int
    flush_errors: int
    down: list[str]
    rss: float


async def measure_agent(config: AgentConfig, warmup: float, seconds: float,
                        servers: list[ServerProcess]) -> Result:
    """Run the agent; measure stored points and CPU over the window after the warm-up."""
    agent = Agent(config)
    await agent.start()
    await asyncio.sleep(warmup)
    # agent.stored moves once per flush (thousands of rows): open and close the window just
    # after a flush so the count is not off by up to one flush.
    await next_flush(agent)
    servers_start, changes_start, machine_start = [s.cpu() for s in servers], changed(servers), machine_cpu()
    start: Sample = sample(agent.stored)
    await asyncio.sleep(seconds)
    await next_flush(agent)
    end: Sample = sample(agent.stored)
    servers_end, changes_end, machine_end = [s.cpu() for s in servers], changed(servers), machine_cpu()
    rss = peak_rss_mb()
    await agent.stop()
    window = Window.between(start, end)
    machine_total = machine_end[1] - machine_start[1]
    busy = (machine_end[0] - machine_start[0]) / machine_total * (os.cpu_count() or 1) if machine_total else 0.0
    down = [r.device.name for r in agent.runners.values() if r.status.state != "up"]
    return Result(window, [(b - a) / window.seconds for a, b in zip(servers_start, servers_end, strict=True)],
                  (changes_end - changes_start) / window.seconds, busy, agent.stored,
                  agent.writer.flush_errors if agent.writer else 0, down, rss)


async def next_flush(agent: Agent) -> None:
    """Return just after the agent's next flush to the twin (or after 5 s without one)."""
    assert agent.writer is not None
    flushes, step = agent.writer.flushes, 0.002
    for _ in range(round(5.0 / step)):  # polled: Agent offers no flush event to wait on
        if agent.writer.flushes != flushes:
            return
        await asyncio.sleep(step)


def changed(servers: list[ServerProcess]) -> int:
    return sum(s.changes() for s in servers)


def history_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM history").fetchone()[0])


# --------------------------------------------------------------------------- report


def report(args: argparse.Namespace, result: Result, history: int) -> None:
    window = result.window
    offered = args.servers * args.vars * args.hz
    servers_cpu = sum(result.servers_cpu)
    cores = os.cpu_count() or 1

    print(f"\ncommand: {command_line()}")
    print(f"setup:   {args.servers} asyncua servers (one process each) x {args.vars} Double variables "
          f"changing at {args.hz:g} Hz (offered {offered:,.0f} points/s), publishing interval "
          f"{args.interval}, warm-up {args.warmup:g} s, window {window.seconds:.1f} s, {cores} cores")
    print_table("agent (the whole process: event loop, OPC UA decode, drivers, twin writer thread)",
                ["figure", "measured", "target"], [
                    ["points/s stored", f"{window.rate:,.0f}", f">= {TARGET_POINTS_PER_S:,}"],
                    ["CPU us/point", f"{window.us_per_item:.2f}", f"<= {TARGET_US_PER_POINT:g}"],
                    ["CPU, share of one core", f"{window.cpu_share:.0%}", ""],
                    ["peak RSS MB", f"{result.rss:.1f}", f"<= {TARGET_RSS_MB:g} (no model)"],
                ])
    print_table("simulated devices and machine (same window)", ["figure", "measured", ""], [
        ["servers' CPU, share of one core (sum)", f"{servers_cpu:.0%}",
         " + ".join(f"{c:.0%}" for c in result.servers_cpu)],
        ["value changes/s made by the servers", f"{result.changes_per_s:,.0f}", f"of {offered:,.0f} asked"],
        ["servers' CPU us/change", f"{1e6 * servers_cpu / result.changes_per_s:.2f}"
         if result.changes_per_s else "n/a", "write + notify + encode"],
        ["machine busy, cores", f"{result.machine_busy:.2f} of {cores}", ""],
    ])
    print(f"\ncheck: agent.stored {result.total:,} (whole run), history rows {history:,}"
          f"{'' if result.total == history else '  MISMATCH'}")
    problems = []
    if result.down:
        problems.append(f"devices not up at the end: {', '.join(result.down)}")
    if result.flush_errors:
        problems.append(f"{result.flush_errors} failed flushes")
    busy_servers = [f"{c:.0%}" for c in result.servers_cpu if c > SATURATED]
    if busy_servers:
        problems.append(f"server processes at {', '.join(busy_servers)} of a core: they limit points/s")
    if result.machine_busy > SATURATED * cores:
        problems.append(f"the machine was {result.machine_busy:.2f} of {cores} cores busy: the rate is "
                        "limited by CPU; the agent's us/point still holds")
    if result.changes_per_s < 0.95 * offered:
        problems.append(f"the servers made {result.changes_per_s:,.0f} of {offered:,.0f} value changes/s asked: "
                        "they fell behind (short of CPU)")
    if window.rate < 0.95 * result.changes_per_s:
        problems.append(f"stored {window.rate:,.0f} of {result.changes_per_s:,.0f} changes/s made: the agent "
                        "fell behind, or a variable changed twice before the server could publish (queue size "
                        "1 keeps the last; asyncua's client keeps one PublishRequest in flight, so slow round "
                        "trips on a loaded machine lose changes)")
    for problem in problems:
        print(f"WARNING: {problem}")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--servers", type=int, default=2, help="simulated OPC UA servers (one process each)")
    parser.add_argument("--vars", type=int, default=1500, help="Double variables (points) per server")
    parser.add_argument("--hz", type=float, default=10.0, help="how often every variable changes, per second")
    parser.add_argument("--interval", help='publishing interval of every device, a duration like "100ms" '
                        "(default: 1/hz)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds run before the window opens")
    parser.add_argument("--data-dir", type=Path, help="where the twin goes (default: a temporary folder, removed)")
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "VARS", "HZ", "COUNTER_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return args
    if args.servers < 1 or args.vars < 1 or args.hz <= 0:
        parser.error("--servers and --vars: at least 1; --hz: above 0")
    if args.interval is None:
        args.interval = f"{round(1000 / args.hz)}ms"
    return args  # config.loads checks --interval like any interval in a config file


async def bench(args: argparse.Namespace, data_dir: Path) -> None:
    servers = start_servers(args.servers, args.vars, args.hz, data_dir)
    try:
        try:
            config = loads(config_text([s.port for s in servers], args.vars, args.interval, data_dir),
                           data_dir / "bench.toml")
        except ConfigError as exc:
            raise SystemExit(f"bench config rejected (check --interval): {exc}") from None
        result = await measure_agent(config, args.warmup, args.seconds, servers)
        history = history_rows(config.twin_path)
    finally:
        stop_servers(servers)
    report(args, result, history)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:
        port, variables, hz, counter = args.serve
        asyncio.run(serve(int(port), int(variables), float(hz), Path(counter)))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(bench(args, args.data_dir.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
