"""Command line: argument parsing, exit codes and printing only; the work lives elsewhere.

Exit status: 0 success, 1 runtime failure, 2 bad config or bad usage, 3 (``status``) the agent
is not running.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_agent import __version__
from edge_agent.config import AgentConfig, load
from edge_agent.config.table import parse_duration
from edge_agent.errors import ConfigError, EdgeAgentError, UsageError

log = logging.getLogger("edge_agent")

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Edge gateway daemon for industrial "
                                     "digital twins: mirrors OPC UA and Modbus devices into a local SQLite twin.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent in the foreground (logs to stderr)")
    run.add_argument("--config", required=True, help="path to the TOML config file")

    check = sub.add_parser("check-config", help="validate a config file without running")
    check.add_argument("--config", required=True, help="path to the TOML config file")
    check.add_argument("--probe", action="store_true",
                       help="also connect to every device once and read its points (read-only: nothing is "
                            "written); exit 1 when a device cannot be read or a point reads bad. Secured OPC UA "
                            "devices use the agent's client certificate under data_dir/pki (created there if "
                            "missing, so run it as the agent's user)")

    status = sub.add_parser("status", help="is the agent running, and what is wrong if anything")
    status.add_argument("--config", required=True, help="path to the TOML config file")
    status.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    twin = sub.add_parser("twin", help="inspect the local twin database")
    twin_sub = twin.add_subparsers(dest="twin_command", required=True, metavar="TWIN_COMMAND")
    show = twin_sub.add_parser("show", help="every point with value, quality, timestamp and unit, and its desired "
                                            "state (value, version, source, status, reason) when it has one")
    show.add_argument("--config", required=True, help="path to the TOML config file")
    show.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    hist = twin_sub.add_parser("history", help="the stored samples of one point")
    hist.add_argument("--config", required=True, help="path to the TOML config file")
    hist.add_argument("point", metavar="POINT", help="point name, e.g. chiller1.supply_temp")
    hist.add_argument("--since", default="10m", help='how far back, as a duration like "10m" (default 10m)')
    hist.add_argument("--limit", type=int, default=None, help="at most this many samples")
    hist.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    outbox = twin_sub.add_parser("outbox", help="the cloud outbox: depth, oldest age, bytes, dropped")
    outbox.add_argument("--config", required=True, help="path to the TOML config file")
    outbox.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    events = twin_sub.add_parser("events", help="anomalies, device outages and other events, oldest first")
    events.add_argument("--config", required=True, help="path to the TOML config file")
    events.add_argument("--since", default="7d", help='how far back, as a duration like "1h" (default 7d)')
    events.add_argument("--limit", type=int, default=None, help="at most this many (the newest)")
    events.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    from edge_agent.remote import operator

    operator.add_parsers(sub)

    writes = twin_sub.add_parser("writes", help="every write attempt through the safety gate, oldest first")
    writes.add_argument("--config", required=True, help="path to the TOML config file")
    writes.add_argument("--since", default="7d", help='how far back, as a duration like "1h" (default 7d)')
    writes.add_argument("--limit", type=int, default=None, help="at most this many (the newest)")
    writes.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    _commission_parsers(sub)

    demo = sub.add_parser("demo", help="run a simulated plant and the agent against it, with a live view")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    demo.add_argument("--data-dir", default=None, help="where the demo twin goes (default: a temp folder)")
    return parser


def _commission_parsers(sub: Any) -> None:
    from edge_agent.commission.defaults import DEFAULT_DEPTH, DEFAULT_MAX_NODES, default_data_dir
    from edge_agent.config import OPCUA_SECURITY, PARITIES

    browse = sub.add_parser(
        "browse", help="list every Variable of an OPC UA server (read-only), or print a config block for it",
        description="Walk the server's Objects folder and list every Variable: its node id (nsu= form, usable as "
                    "points[].node), browse path, data type, whether it is writable, and its value and status. "
                    "Read-only: it only browses and reads, and never writes to the server.")
    browse.add_argument("endpoint", metavar="ENDPOINT", help="opc.tcp://host:port/path")
    browse.add_argument("--security", choices=OPCUA_SECURITY, default="None", help="security mode (default None)")
    browse.add_argument("--username", default=None, help="log in with this user name")
    browse.add_argument("--password-file", default=None,
                        help="file holding the password (its first line); never give a password on the command line")
    browse.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help=f"levels to walk below the root (default {DEFAULT_DEPTH})")
    browse.add_argument("--max-nodes", type=int, default=DEFAULT_MAX_NODES,
                        help=f"stop after this many nodes (default {DEFAULT_MAX_NODES})")
    browse.add_argument("--root", default=None, metavar="NODE",
                        help='start here instead of the Objects folder, e.g. "nsu=urn:plc;s=Line1"')
    browse.add_argument("--include-server", action="store_true",
                        help="also walk the standard Server object (status, capabilities, diagnostics), "
                             "left out by default")
    browse.add_argument("--timeout", default="5s", help='per request, as a duration (default "5s")')
    browse.add_argument("--data-dir", default=None,
                        help="where the client certificate for --security lives, in pki/ "
                             f"(default {default_data_dir()}; give the agent's data_dir to use the certificate "
                             "the server already trusts)")
    output = browse.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print a JSON array (node, path, type, writable, value, ...)")
    output.add_argument("--toml", metavar="DEVICE", default=None,
                        help="print a [[devices]] block named DEVICE with one point per variable "
                             "(writable ones commented out until they get min and max)")

    probe = sub.add_parser("probe", help="read a device once and show every way to decode it (read-only)")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True, metavar="PROTOCOL")
    modbus = probe_sub.add_parser(
        "modbus", help="read Modbus registers once and decode them in every type, byte and word order",
        description="Read COUNT registers (or bits) from ADDRESS once, over TCP (HOST:PORT) or RTU (--serial), and "
                    "show each address as int16/uint16 and each pair and quadruple as int32/uint32/float32 and "
                    "int64/uint64/float64 in every byte and word order, marking the plausible ones with *. "
                    "Read-only: it sends only read requests and never writes to the device.")
    modbus.add_argument("address_port", metavar="HOST:PORT", nargs="?", default=None,
                        help="Modbus TCP device (port 502 when left out)")
    modbus.add_argument("--serial", default=None, metavar="PORT", help="Modbus RTU serial port, e.g. /dev/ttyUSB0")
    modbus.add_argument("--baudrate", type=int, default=19200, help="RTU baud rate (default 19200)")
    modbus.add_argument("--parity", choices=PARITIES, default="E", help="RTU parity (default E)")
    modbus.add_argument("--stopbits", type=int, choices=(1, 2), default=1, help="RTU stop bits (default 1)")
    modbus.add_argument("--bytesize", type=int, choices=(7, 8), default=8, help="RTU data bits (default 8)")
    modbus.add_argument("--unit", type=int, default=1, help="unit (slave) id, 0..255 (default 1)")
    modbus.add_argument("--table", choices=("holding", "input", "coil", "discrete"), default="holding",
                        help="which table (default holding)")
    modbus.add_argument("--address", type=int, required=True, help="first address, 0-based")
    modbus.add_argument("--count", type=int, required=True, help="how many registers (or bits)")
    modbus.add_argument("--timeout", default="3s", help='as a duration (default "3s")')
    modbus.add_argument("--json", action="store_true",
                        help="print a JSON object with registers (raw) and decoded (address, type, word_order, "
                             "byte_order, value, plausible)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(load(args.config))
        if args.command == "check-config":
            return _check(args.config, probe=args.probe)
        if args.command == "browse":
            return _browse(args)
        if args.command == "probe":
            return _probe_modbus(args)
        if args.command == "twin":
            return _twin(args)
        if args.command == "status":
            return _status(args.config, args.json)
        if args.command in ("keys", "command"):
            return _operator(args)
        if args.command == "demo":
            from edge_agent.demo.runner import run_demo

            return run_demo(duration=args.duration, data_dir=args.data_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    return EXIT_FAIL  # pragma: no cover - argparse rejects unknown commands


def _operator(args: argparse.Namespace) -> int:
    from edge_agent.remote import operator

    if args.command == "keys":
        private, public = operator.new_keys(args.name, Path(args.dir))
        print(f"private key {private} (keep it secret)\npublic key  {public} (put it in the gateway's "
              f"[[commands.operators]] public_key)")
        return EXIT_OK
    answer = operator.send(args)
    print(json.dumps(answer, indent=1, ensure_ascii=False))
    return EXIT_OK if answer.get("ok") is True else EXIT_FAIL


def _check(path: str, probe: bool = False) -> int:
    config = load(path)
    points = sum(len(d.points) for d in config.devices)
    print(f"{path}: ok ({len(config.devices)} devices, {points} points; twin at {config.twin_path})")
    if not probe:
        return EXIT_OK
    from edge_agent.commission.check import check_devices
    from edge_agent.commission.report import check_text

    checks = asyncio.run(check_devices(config))
    print(check_text(checks))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAIL


def _duration(flag: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise UsageError(f'{flag}: expected a positive duration like "3s", got "{text}"')
    return seconds


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is None:
        return None
    if args.username is None:
        raise UsageError("--password-file needs --username")
    try:
        lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--password-file: cannot read {args.password_file}: {exc}") from exc
    if not lines or not lines[0]:
        raise UsageError(f"--password-file: {args.password_file} is empty; expected the password on its first line")
    return lines[0]


def _browse(args: argparse.Namespace) -> int:
    from edge_agent.commission.browse import browse
    from edge_agent.commission.defaults import default_data_dir
    from edge_agent.commission.emit import device_block
    from edge_agent.commission.report import browse_json, browse_text
    from edge_agent.config import OpcUaDevice

    if not args.endpoint.startswith("opc.tcp://"):
        raise UsageError(f'ENDPOINT: expected an URL starting with "opc.tcp://", got "{args.endpoint}"')
    if args.toml is not None and not args.toml.strip():
        raise UsageError("--toml: expected a device name")
    if args.depth < 1 or args.max_nodes < 1:
        raise UsageError("--depth and --max-nodes: expected numbers of at least 1")
    device = OpcUaDevice(name=args.toml or "browse", protocol="opcua", endpoint=args.endpoint,
                         security=args.security, username=args.username, password=_password(args),
                         timeout=_duration("--timeout", args.timeout))
    if args.security != "None":  # show both certificates' thumbprints: the operator compares them
        logging.basicConfig(format="%(message)s")
        logging.getLogger("drivers").setLevel(logging.INFO)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    result = asyncio.run(browse(device, data_dir, root=args.root, depth=args.depth, max_nodes=args.max_nodes,
                                include_server=args.include_server))
    if args.json:
        print(json.dumps(browse_json(result), indent=1, ensure_ascii=False))
    elif args.toml is not None:
        print(device_block(args.toml, args.endpoint, result.variables, security=args.security,
                           username=args.username), end="")
    else:
        print(browse_text(result))
    if result.stopped:
        print(f"warning: {result.stopped}", file=sys.stderr)
    return EXIT_OK


def _probe_modbus(args: argparse.Namespace) -> int:
    from edge_agent.commission.probe import ModbusTarget, parse_host_port, probe
    from edge_agent.commission.report import probe_json, probe_text

    if (args.address_port is None) == (args.serial is None):
        raise UsageError("probe modbus: give either HOST:PORT (TCP) or --serial PORT (RTU)")
    if not 0 <= args.unit <= 255:
        raise UsageError(f"--unit: expected 0..255, got {args.unit}")
    timeout = _duration("--timeout", args.timeout)
    if args.serial is not None:
        target = ModbusTarget(serial_port=args.serial, baudrate=args.baudrate, parity=args.parity,
                              stopbits=args.stopbits, bytesize=args.bytesize, unit=args.unit, timeout=timeout)
    else:
        host, port = parse_host_port(args.address_port)
        target = ModbusTarget(host=host, port=port, unit=args.unit, timeout=timeout)
    result = asyncio.run(probe(target, args.table, args.address, args.count))
    print(json.dumps(probe_json(result), indent=1) if args.json else probe_text(result))
    return EXIT_OK


def _run(config: AgentConfig) -> int:
    from edge_agent.service import logs

    logs.setup(config.agent.log_level, config.agent.log_format)
    return asyncio.run(_run_async(config))


async def _run_async(config: AgentConfig) -> int:
    from edge_agent.agent import Agent
    from edge_agent.service.notify import Notifier, heartbeat

    notifier = Notifier.from_environment()
    stop, reload = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    agent = Agent(config)
    await agent.start()
    # READY once the config is loaded and the twin open; devices connect in the background,
    # so a missing device never holds up start-up.
    notifier.ready(agent.status().summary())
    beat = asyncio.create_task(heartbeat(notifier, lambda: agent.status().summary()), name="watchdog")
    try:
        while not stop.is_set():
            waiters = [asyncio.ensure_future(e.wait()) for e in (stop, reload)]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if reload.is_set() and not stop.is_set():
                reload.clear()
                notifier.reloading()
                agent = await _reload(agent)
                notifier.ready(agent.status().summary())
    finally:
        notifier.stopping("stopping")
        beat.cancel()
        await agent.stop()
    return EXIT_OK


async def _reload(agent: Any) -> Any:
    """SIGHUP: re-read the config file; apply it if valid, else keep running as before."""
    source = agent.config.source
    try:
        new = await asyncio.to_thread(load, source)  # a big file must not hold up the watchdog
    except ConfigError as exc:
        log.error("reload refused, the running config stays in place; %d problem(s) in %s:",
                  len(exc.problems), source)
        for problem in exc.problems:
            log.error("%s", problem)
        return agent
    except Exception:  # whatever is in the file, a reload must never take the daemon down
        log.exception("reload refused, the running config stays in place: %s could not be read", source)
        return agent
    try:
        return await _apply(agent, new)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("reload of %s failed part-way; the agent keeps running (check `edge-agent status`)", source)
        return agent


async def _apply(agent: Any, new: AgentConfig) -> Any:
    from edge_agent.agent import Agent

    if agent.needs_restart(new):
        log.info("reload: agent.* or twin.* changed; restarting the agent in place")
        old_config = agent.config
        await agent.stop()
        try:
            agent = Agent(new)
            await agent.start()
        except Exception as exc:  # any failure to start goes back to the config that ran
            log.error("reload failed, going back to the running config: %s", exc)
            await agent.stop()
            agent = Agent(old_config)
            await agent.start()
        return agent
    await agent.reload(new)
    return agent


def _status(path: str, as_json: bool) -> int:
    from edge_agent.service import status as health

    config = load(path)
    status = health.read(config.agent.data_dir / health.STATUS_FILE)
    if status is None:
        reason = f"no status in {config.agent.data_dir}; it has not run with this config"
        if as_json:
            print(json.dumps({"running": False, "status_file": str(config.agent.data_dir / health.STATUS_FILE),
                              "reason": reason}, indent=1))
        else:
            print(f"edge-agent is not running ({reason})")
        return 3
    alive = health.running(status)
    age = time.time() - float(status.get("ts", 0))
    status["running"] = alive and age < 60
    status["status_age_s"] = age
    if as_json:
        print(json.dumps(status, indent=1))
    else:
        _print_status(status, alive, age)
    return EXIT_OK if status["running"] else 3


def _print_status(status: dict[str, Any], alive: bool, age: float) -> None:
    if alive and age < 60:
        head = f"edge-agent {status['version']} running (pid {status['pid']}), up {_span(status['uptime_s'])}"
    elif alive:
        head = f"edge-agent (pid {status['pid']}) is running but has not reported for {_span(age)}: it may be stuck"
    else:
        head = f"edge-agent is NOT running; last seen {_span(age)} ago (pid {status['pid']})"
    print(f"{head}\ngateway {status['gateway']} at site {status['site']}, config {status['config']}")
    print("devices:")
    for d in status["devices"]:
        last = f"last good read {_span(time.time() - d['last_ok'])} ago" if d["last_ok"] else "never read"
        error = f"; error: {d['last_error']}" if d["state"] != "up" and d["last_error"] else ""
        print(_printable(f"  {d['name']:20} {d['protocol']:10} {d['state']:10} {last}{error}"))
    twin = status.get("twin") or {}
    if twin.get("writing") is False:
        since = twin.get("failing_since")
        print(f"twin: NOT writing{f' for {_span(time.time() - since)}' if since else ''}: {twin.get('last_error')}; "
              f"{twin.get('dropped', 0)} readings let go so far (latest values kept in memory)")
    for notice in status.get("storage") or []:
        print(f"storage: {notice}")
    mqtt = status.get("mqtt")
    if mqtt is None:
        print("mqtt: off (no [mqtt] section: offline only)")
    else:
        link = "connected" if mqtt.get("connected") else f"NOT connected: {mqtt.get('last_error') or 'connecting'}"
        oldest = mqtt.get("outbox_oldest_age_s")
        print(f"mqtt: {mqtt.get('broker', '')} {_printable(link)}\n  outbox {mqtt.get('outbox_depth', '?')} messages"
              + (f", oldest {_span(oldest)}" if oldest else "")
              + f", dropped {mqtt.get('dropped_messages', 0)} messages"
              + (f", {mqtt['dropped_events']} events" if mqtt.get("dropped_events") else ""))
    for m in status.get("models", []):
        score = "-" if m["last_score"] is None else f"{m['last_score']:.3g}"
        note = m["last_error"] or (f"not scoring: {m['last_skip']}" if m["last_skip"] else "")
        print(f"model {m['name']} ({m['kind']}): {m['state']}, last score {score}"
              + (", ANOMALY ACTIVE" if m["anomaly"] else "") + (f"; {note}" if note else ""))
    for o in status.get("overrides", []):
        event = f"ack event {o['event']}" if o.get("event") is not None else "ack its override event"
        print(f"override: {o['point']} changed at the device ({o['old']} -> {o['new']}) "
              f"{_span(time.time() - o['since'])} ago; automatic writes paused for "
              f"{_span(o['until'] - time.time())} more, or {event}")
    if status.get("errors"):
        print("recent warnings and errors:")
        for line in status["errors"]:
            print(f"  {_printable(line)}")


def _span(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _outbox(config: AgentConfig, as_json: bool) -> int:
    from edge_agent.store.views import read_stats

    path = config.agent.data_dir / "outbox.db"
    if not path.exists():
        note = "no [mqtt] section: the agent runs offline only" if config.mqtt is None else "the agent has not run yet"
        print(f"error: no outbox at {path} ({note})", file=sys.stderr)
        return EXIT_FAIL
    stats = read_stats(path)
    body = {"depth": stats.depth, "bytes": stats.bytes, "oldest_age_s": stats.oldest_age_s,
            "dropped_messages": stats.dropped_messages, "dropped_samples": stats.dropped_samples,
            "next_telemetry_seq": stats.next_telemetry_seq, "next_event_seq": stats.next_event_seq,
            "file_bytes": stats.file_bytes, "dropped_events": stats.dropped_events,
            "dropped_responses": stats.dropped_responses}
    if as_json:
        print(json.dumps(body, indent=1))
    else:
        age = "-" if stats.oldest_age_s is None else f"{stats.oldest_age_s:.1f} s"
        print(f"outbox {path}\n  depth          {stats.depth} messages\n  oldest         {age}\n"
              f"  bytes          {stats.bytes} (file {stats.file_bytes})\n"
              f"  dropped        {stats.dropped_messages} messages, {stats.dropped_samples} samples\n"
              f"  dropped events {stats.dropped_events} events, {stats.dropped_responses} command responses\n"
              f"  next seq       telemetry {stats.next_telemetry_seq}, events {stats.next_event_seq}")
    return EXIT_OK


def _twin(args: argparse.Namespace) -> int:
    from edge_agent.store.views import TwinView

    config = load(args.config)
    if args.twin_command == "outbox":
        return _outbox(config, args.json)
    twin = TwinView.open(config.twin_path)
    try:
        if args.twin_command == "show":
            return _show(twin.current(), twin.desired(), args.json)
        try:
            since = time.time() - parse_duration(args.since)
        except ValueError:
            print(f'error: --since: expected a duration like "10m", got "{args.since}"', file=sys.stderr)
            return EXIT_CONFIG
        if args.twin_command == "events":
            return _events(twin.iter_events(since, limit=args.limit), args.json)
        if args.twin_command == "writes":
            return _writes(twin.iter_writes(since, limit=args.limit), args.json)
        if args.point not in twin.point_names():
            print(f'error: no point named "{args.point}" in {config.twin_path}', file=sys.stderr)
            return EXIT_FAIL
        rows = twin.history(args.point, since, limit=args.limit)
        if args.json:
            print(json.dumps([{"name": args.point, **r} for r in rows], indent=1))
        else:
            _table(["time", "value", "quality"], [[_when(r["ts"]), _fmt(r["value"]), r["quality"]] for r in rows])
        return EXIT_OK
    finally:
        twin.close()


def _show(rows: list[dict[str, Any]], desired_rows: list[dict[str, Any]], as_json: bool) -> int:
    """Every point; a point with a desired state also shows it, and why it is not applied when it is not."""
    desired = {d["point"]: {k: d[k] for k in ("value", "version", "source", "status", "reason")} for d in desired_rows}
    if as_json:
        print(json.dumps([{**_public_point(r), "desired": desired.get(r["name"])} for r in rows], indent=1))
        return EXIT_OK
    table = []
    for r in rows:
        d = desired.get(r["name"])
        wanted = [_fmt(d["value"]), f'{d["status"]} (v{d["version"]}, {d["source"]})'] if d else ["-", "-"]
        table.append([r["name"], _fmt(r["value"]), r["quality"], _when(r["ts"]), r["unit"], *wanted])
    _table(["point", "value", "quality", "time", "unit", "desired", "desired status"], table)
    reasons = [(r["name"], desired[r["name"]]) for r in rows if desired.get(r["name"], {}).get("reason")]
    if reasons:
        print()
        for name, d in reasons:
            print(_printable(f'{name}: desired {_fmt(d["value"])} {d["status"]}: {d["reason"]}'))
    return EXIT_OK


def _events(rows: Iterable[dict[str, Any]], as_json: bool) -> int:
    """Events as they come from the twin's cursor: a month of them never sits in memory at once."""
    if as_json:
        _json_array({"id": r["id"], "ts": r["ts"], "model": r["source"] if r["kind"] == "anomaly" else None, **r}
                    for r in rows)
        return EXIT_OK
    _stream_table(["time", "source", "kind", "state", "score", "message"],
                  ([_when(r["ts"]), r["source"], r["kind"], r["state"], _fmt(r["score"]), r["message"]] for r in rows))
    return EXIT_OK


def _writes(rows: Iterable[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        _json_array(rows)
        return EXIT_OK
    _stream_table(["time", "source", "actor", "point", "old", "requested", "written", "readback", "result", "reason"],
                  ([_when(r["ts"]), r["source"], r["actor"] or "-", r["point"], _fmt(r["old"]), _fmt(r["requested"]),
                    _fmt(r["written"]), _fmt(r["readback"]), r["result"], r["reason"]] for r in rows))
    return EXIT_OK


def _json_array(items: Iterable[Any]) -> None:
    """Print what ``json.dumps(list(items), indent=1)`` would, one item at a time."""
    first = True
    for item in items:
        text = json.dumps(item, indent=1).replace("\n", "\n ")
        print(("[\n " if first else ",\n ") + text, end="")
        first = False
    print("[]" if first else "\n]")


def _stream_table(headers: list[str], rows: Iterator[list[str]], page: int = 1000) -> None:
    """:func:`_table` in pages: the first page sets the column widths, later rows keep to them where they fit."""
    batch = list(itertools.islice(rows, page))
    widths = _table(headers, batch)
    while batch := list(itertools.islice(rows, page)):
        for row in batch:
            print("  ".join(_printable(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _public_point(row: dict[str, Any]) -> dict[str, Any]:
    return {"name": row["name"], "value": row["value"], "quality": row["quality"], "ts": row["ts"],
            "unit": row["unit"], "device": row["device"], "received_ts": row["received_ts"]}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _table(headers: list[str], rows: list[list[str]]) -> list[int]:
    rows = [[_printable(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return widths


def _printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (escape sequences, carriage returns, bidi
    overrides) shown escaped. Names and messages in the twin may come from devices and from
    operators' commands; they must not drive the operator's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
