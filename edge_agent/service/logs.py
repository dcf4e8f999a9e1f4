"""Log lines: one per event, ``key=value`` text (or JSON lines), to stderr.

Text::

    2026-11-26T21:04:05.120Z level=warning logger=edge_agent.device msg="modbus device \\"pump1\\": ..."

Fields passed with ``extra={...}`` are appended as more ``key=value`` pairs. Under systemd
(``$JOURNAL_STREAM`` set) the timestamp is left to journald.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from typing import Any

# Attributes every LogRecord has; anything else was passed in ``extra`` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _stamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.created % 1 * 1000):03d}Z"


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... logger=... msg="..." key=value``."""

    def __init__(self, timestamps: bool = True) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = [_stamp(record)] if self.timestamps else []
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        parts += [f"{key}={_quote(value)}" for key, value in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"ts": _stamp(record), "level": record.levelname.lower(), "logger": record.name,
                                "msg": record.getMessage(), **_fields(record)}
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False, default=str)


def setup(level: str, fmt: str) -> None:
    """Send every log line to stderr in the configured format and level."""
    handler = logging.StreamHandler(sys.stderr)
    journald = "JOURNAL_STREAM" in os.environ
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter(timestamps=not journald))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncua and pymodbus log every reconnect attempt at WARNING/ERROR; our own supervisors
    # report those once (and recovery once), so the libraries stay quiet unless debugging.
    if level != "debug":
        for noisy in ("asyncua", "pymodbus"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)


class RecentErrors(logging.Handler):
    """Keeps the last warnings and errors for `edge-agent status`."""

    def __init__(self, sink: deque[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        self.sink.append(f"{when} {record.levelname} {record.getMessage()}")
