"""Log lines: key=value text and JSON, one line per event."""

from __future__ import annotations

import json
import logging

from edge_agent.service.logs import JsonFormatter, KeyValueFormatter


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "edge_agent.device", "levelno": logging.WARNING,
                                    "levelname": "WARNING", "msg": msg, "args": args, "created": 0.5})
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_key_value_line() -> None:
    line = KeyValueFormatter().format(_record('device %s: "no answer"', "pump1", device="pump1", attempt=3))
    assert line == ('1970-01-01T00:00:00.500Z level=warning logger=edge_agent.device '
                    'msg="device pump1: \\"no answer\\"" device=pump1 attempt=3')
    assert "\n" not in line


def test_key_value_without_timestamp_under_journald() -> None:
    assert KeyValueFormatter(timestamps=False).format(_record("ok")) == "level=warning logger=edge_agent.device msg=ok"


def test_json_line() -> None:
    body = json.loads(JsonFormatter().format(_record("device %s down", "pump1", device="pump1")))
    assert body == {"ts": "1970-01-01T00:00:00.500Z", "level": "warning", "logger": "edge_agent.device",
                    "msg": "device pump1 down", "device": "pump1"}
