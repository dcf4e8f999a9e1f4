"""``status`` and ``twin show|history|events|writes|outbox``: what the agent and its files say, printed."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from edge_agent.cli.output import EXIT_CONFIG, EXIT_FAIL, EXIT_NOT_RUNNING, EXIT_OK, fmt, printable, table, when
from edge_agent.config import AgentConfig, load
from edge_agent.config.table import parse_duration


def status(path: str, as_json: bool) -> int:
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
        return EXIT_NOT_RUNNING
    alive = health.running(status)
    age = time.time() - float(status.get("ts", 0))
    status["running"] = alive and age < 60
    status["status_age_s"] = age
    if as_json:
        print(json.dumps(status, indent=1))
    else:
        _print_status(status, alive, age)
    return EXIT_OK if status["running"] else EXIT_NOT_RUNNING


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
        print(printable(f"  {d['name']:20} {d['protocol']:10} {d['state']:10} {last}{error}"))
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
        print(f"mqtt: {mqtt.get('broker', '')} {printable(link)}\n  outbox {mqtt.get('outbox_depth', '?')} messages"
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
            print(f"  {printable(line)}")


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


def twin(args: argparse.Namespace) -> int:
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
            table(["time", "value", "quality"], [[when(r["ts"]), fmt(r["value"]), r["quality"]] for r in rows])
        return EXIT_OK
    finally:
        twin.close()


def _show(rows: list[dict[str, Any]], desired_rows: list[dict[str, Any]], as_json: bool) -> int:
    """Every point; a point with a desired state also shows it, and why it is not applied when it is not."""
    desired = {d["point"]: {k: d[k] for k in ("value", "version", "source", "status", "reason")} for d in desired_rows}
    if as_json:
        print(json.dumps([{**_public_point(r), "desired": desired.get(r["name"])} for r in rows], indent=1))
        return EXIT_OK
    shown = []
    for r in rows:
        d = desired.get(r["name"])
        wanted = [fmt(d["value"]), f'{d["status"]} (v{d["version"]}, {d["source"]})'] if d else ["-", "-"]
        shown.append([r["name"], fmt(r["value"]), r["quality"], when(r["ts"]), r["unit"], *wanted])
    table(["point", "value", "quality", "time", "unit", "desired", "desired status"], shown)
    reasons = [(r["name"], desired[r["name"]]) for r in rows if desired.get(r["name"], {}).get("reason")]
    if reasons:
        print()
        for name, d in reasons:
            print(printable(f'{name}: desired {fmt(d["value"])} {d["status"]}: {d["reason"]}'))
    return EXIT_OK


def _events(rows: Iterable[dict[str, Any]], as_json: bool) -> int:
    """Events as they come from the twin's cursor: a month of them never sits in memory at once."""
    if as_json:
        _json_array({"id": r["id"], "ts": r["ts"], "model": r["source"] if r["kind"] == "anomaly" else None, **r}
                    for r in rows)
        return EXIT_OK
    _stream_table(["time", "source", "kind", "state", "score", "message"],
                  ([when(r["ts"]), r["source"], r["kind"], r["state"], fmt(r["score"]), r["message"]] for r in rows))
    return EXIT_OK


def _writes(rows: Iterable[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        _json_array(rows)
        return EXIT_OK
    _stream_table(["time", "source", "actor", "point", "old", "requested", "written", "readback", "result", "reason"],
                  ([when(r["ts"]), r["source"], r["actor"] or "-", r["point"], fmt(r["old"]), fmt(r["requested"]),
                    fmt(r["written"]), fmt(r["readback"]), r["result"], r["reason"]] for r in rows))
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
    widths = table(headers, batch)
    while batch := list(itertools.islice(rows, page)):
        for row in batch:
            print("  ".join(printable(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _public_point(row: dict[str, Any]) -> dict[str, Any]:
    return {"name": row["name"], "value": row["value"], "quality": row["quality"], "ts": row["ts"],
            "unit": row["unit"], "device": row["device"], "received_ts": row["received_ts"]}
