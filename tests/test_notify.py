"""sd_notify against a real unix datagram socket bound by the test (path and abstract)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.service.notify import Notifier, heartbeat
from tests.helpers import NotifyReceiver, wait_for, wait_for_sync

PERIOD = 0.2  # WATCHDOG_USEC=400000 -> a ping every 0.2 s


Receiver = NotifyReceiver


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        name = f"edge-agent-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    rx = Receiver(sock, address)
    yield rx
    rx.close()


def _env(rx: Receiver, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": rx.address, **extra}


def test_ready_status_reloading_stopping(receiver: Receiver) -> None:
    notifier = Notifier.from_environment(_env(receiver))
    assert notifier.enabled
    before = time.monotonic_ns() // 1000
    assert notifier.ready("2 devices, twin open")
    assert notifier.status("chiller1 up\npump1 down")
    assert notifier.reloading()
    after = time.monotonic_ns() // 1000
    assert notifier.stopping()
    wait_for_sync(lambda: len(receiver.messages) == 4, timeout=5, what="four datagrams")
    got = [m[1] for m in receiver.messages]
    assert got[0] == {"READY": "1", "STATUS": "2 devices, twin open"}
    assert got[1] == {"STATUS": "chiller1 up pump1 down"}  # one line: a newline would start a field
    assert got[2]["RELOADING"] == "1"
    assert before <= int(got[2]["MONOTONIC_USEC"]) <= after  # CLOCK_MONOTONIC, as systemd reads it
    assert got[3] == {"STOPPING": "1"}
    notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "/run/none", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environment(env).watchdog_interval() == 15.0
    assert Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 15.0
    # Meant for another process, nonsense, zero, or no socket at all: no watchdog.
    assert Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert Notifier.from_environment({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier.from_environment({**env, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier.from_environment({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


async def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    # The heartbeat has nothing to do and returns at once instead of spinning.
    await asyncio.wait_for(heartbeat(notifier, lambda: "ok"), timeout=1)


def test_send_failure_is_logged_once_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.DEBUG, logger="edge_agent.service.notify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.status("x") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gone.sock" in warnings[0].getMessage()
    # The socket appears (systemd came back): sending works again and says so once.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "gone.sock"))
    try:
        with caplog.at_level(logging.INFO, logger="edge_agent.service.notify"):
            assert notifier.watchdog() is True
        assert sock.recv(100) == b"WATCHDOG=1\n"
        assert any("works again" in r.getMessage() for r in caplog.records)
    finally:
        sock.close()
        notifier.close()


async def test_heartbeat_pings_and_stops_while_the_loop_is_blocked(receiver: Receiver) -> None:
    notifier = Notifier.from_environment(_env(receiver, WATCHDOG_USEC=str(int(PERIOD * 2 * 1_000_000))))
    health = {"text": "2/2 devices up"}
    task = asyncio.create_task(heartbeat(notifier, lambda: health["text"]))
    try:
        await wait_for(lambda: len(receiver.with_key("WATCHDOG")) >= 3, timeout=10, what="three pings")
        statuses = [m[1]["STATUS"] for m in receiver.with_key("STATUS")]
        assert statuses == ["2/2 devices up"]  # sent with the first ping, then only on change

        health["text"] = "1/2 devices up; pump1: connection refused"
        await wait_for(lambda: len(receiver.with_key("STATUS")) == 2, timeout=10, what="status refresh")
        assert receiver.with_key("STATUS")[-1][1]["STATUS"] == "1/2 devices up; pump1: connection refused"

        # Block the event loop for three periods. This blocking sleep IS the test: a stuck loop
        # must stop the pings, so systemd's watchdog fires.
        blocked_from = time.monotonic()
        time.sleep(3 * PERIOD)  # noqa: ASYNC251 - blocking the loop is the point here
        blocked_until = time.monotonic()
        # A ping sent just before the block may be read by the thread a moment later.
        during = [t for t, _ in receiver.with_key("WATCHDOG") if blocked_from + PERIOD / 2 < t < blocked_until]
        assert during == []

        # The loop runs again: pings resume.
        count = len(receiver.with_key("WATCHDOG"))
        await wait_for(lambda: len(receiver.with_key("WATCHDOG")) >= count + 2, timeout=10, what="pings resume")
        assert all(t > blocked_until for t, _ in receiver.with_key("WATCHDOG")[count:])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


async def test_heartbeat_survives_a_failing_status_summary(receiver: Receiver) -> None:
    notifier = Notifier.from_environment(_env(receiver, WATCHDOG_USEC=str(int(PERIOD * 2 * 1_000_000))))

    def broken() -> str:
        raise RuntimeError("no twin")

    task = asyncio.create_task(heartbeat(notifier, broken))
    try:
        await wait_for(lambda: len(receiver.with_key("WATCHDOG")) >= 2, timeout=10, what="pings")
        assert receiver.with_key("STATUS")[0][1]["STATUS"] == "status summary failed: RuntimeError('no twin')"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()
