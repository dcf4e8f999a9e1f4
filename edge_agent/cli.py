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

    status = sub.add_parser("status", help="is the agent running, and what is wrong if anything")
    status.add_argument("--config", required=True, help="path to the TOML config file")
    status.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    twin = sub.add_parser("twin", help="inspect the local twin database")
    twin_sub = twin.add_subparsers(dest="twin_command", required=True, metavar="TWIN_COMMAND")
    show = twin_sub.add_parser("show", help="every point with value, quality, timestamp and unit")
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

    demo = sub.add_parser("demo", help="run a simulated plant and the agent against it, with a live view")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    demo.add_argument("--data-dir", default=None, help="where the demo twin goes (default: a temp folder)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(load(args.config))
        if args.command == "check-config":
            return _check(args.config)
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


def _check(path: str) -> int:
    config = load(path)
    points = sum(len(d.points) for d in config.devices)
    print(f"{path}: ok ({len(config.devices)} devices, {points} points; twin at {config.twin_path})")
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
            rows = twin.current()
            if args.json:
                print(json.dumps([_public_point(r) for r in rows], indent=1))
            else:
                _table(["point", "value", "quality", "time", "unit"],
                       [[r["name"], _fmt(r["value"]), r["quality"], _when(r["ts"]), r["unit"]] for r in rows])
            return EXIT_OK
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
