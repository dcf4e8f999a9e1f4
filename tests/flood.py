"""A flood of hostile input on the ``cmd`` topic and the gauges that show what it cost.

Shared by tests/test_commands_hostile.py (modest volumes, coarse bounds) and bench/bench_hostile.py
(100 MB, figures for docs/benchmarks.md). The flood is published by ``mosquitto_pub``, a client that
is neither this project's code nor Python, in its own process: it sends as fast as the broker takes
it and costs the agent's process nothing but the messages themselves.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_agent.service.logs import KeyValueFormatter
from tests.mqtt_broker import Broker


def junk(size: int, *, operator_bytes: int = 700_000, operator: str | None = None, name: str = "ping") -> bytes:
    """An unsigned command of about ``size`` bytes: every field well-formed, a 64-byte ``sig`` of
    random bytes, an operator name of ``operator_bytes`` (or ``operator``), the rest padding in args."""
    now = int(time.time())
    body: dict[str, Any] = {"id": f"junk-{os.urandom(6).hex()}", "name": name, "args": {"pad": ""},
                            "operator": operator if operator is not None else "o" * operator_bytes,
                            "issued_at": now, "expires_at": now + 60,
                            "sig": base64.b64encode(os.urandom(64)).decode()}
    room = size - len(json.dumps(body))
    body["args"]["pad"] = "x" * max(0, room)
    return json.dumps(body).encode()


def mosquitto_pub() -> str:
    found = shutil.which("mosquitto_pub")
    if found is None:
        raise RuntimeError("mosquitto_pub is not installed (apt-get install mosquitto-clients)")
    return found


def publish(broker: Broker, topic: str, *, file: Path | None = None, repeat: int = 1,
            lines: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``mosquitto_pub`` publishing ``file`` ``repeat`` times (or each line of ``lines``), QoS 0."""
    pki = broker.pki
    argv = [mosquitto_pub(), "-h", broker.host, "-p", str(broker.port), "--cafile", str(pki.ca_cert),
            "--cert", str(pki.operator_cert), "--key", str(pki.operator_key), "-V", "5", "-q", "0", "-t", topic,
            "-i", f"flood-{os.getpid()}-{time.monotonic_ns()}"]
    if lines is not None:
        return subprocess.Popen([*argv, "-l"], stdin=lines.open("rb"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    assert file is not None
    if repeat > 1:
        argv += ["--repeat", str(repeat)]
    return subprocess.Popen([*argv, "-f", str(file)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def disk_bytes(directory: Path) -> int:
    """Bytes of every file under ``directory`` (SQLite files with their WAL, status.json, keys)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


class LogMeter(logging.Handler):
    """Counts what the agent would write to its log: lines and bytes, as its key=value format renders them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(KeyValueFormatter())
        self.lines = 0
        self.bytes = 0
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        self.lines += 1
        self.bytes += len(text.encode("utf-8", "replace")) + 1
        self.messages.append(text[:300])


@contextmanager
def metered_logs() -> Iterator[LogMeter]:
    """The root logger at INFO (the agent's default level) with a :class:`LogMeter` attached."""
    root = logging.getLogger()
    meter, level = LogMeter(), root.level
    root.addHandler(meter)
    root.setLevel(logging.INFO)
    try:
        yield meter
    finally:
        root.removeHandler(meter)
        root.setLevel(level)


class LoopWatch:
    """The longest time the event loop was held up: a task that asks for 5 ms sleeps and measures
    how late each one ends."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(self.tick)
            self.longest = max(self.longest, time.perf_counter() - began - self.tick)

    def start(self) -> LoopWatch:
        self._task = asyncio.create_task(self._run(), name="loop-watch")
        return self

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return self.longest
