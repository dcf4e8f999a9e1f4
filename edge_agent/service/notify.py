"""sd_notify in pure Python: tell systemd when the agent is ready, reloading, stopping, and alive.

The protocol is one datagram of ``KEY=value`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract socket written ``@name``); see sd_notify(3).
Outside systemd the variable is unset and every call is a no-op, so the agent calls
these helpers unconditionally::

    notifier = Notifier.from_environment()
    notifier.ready("3 devices, twin open")          # after config loaded and twin opened
    task = asyncio.create_task(heartbeat(notifier, agent_summary))
    ...
    notifier.reloading()                             # on SIGHUP, then ready() when applied or refused
    notifier.stopping()                              # on SIGTERM

Sending never raises: a vanished socket is logged once and the agent carries on, because
losing the supervisor's ear must not take the plant's data path down with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

STATUS_PERIOD = 10.0
"""Seconds between STATUS= refreshes when systemd asked for no watchdog."""


class Notifier:
    """Sends sd_notify messages to one socket address; a no-op when ``address`` is None."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            # systemd >= 254 may also hand out "vsock:CID:PORT"; only unix sockets are spoken here.
            log.warning("NOTIFY_SOCKET=%s: not a unix socket path or @abstract name; not notifying systemd",
                        address)
            address = None
        return cls(address, watchdog_usec=_watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to (the agent runs under systemd Type=notify)."""
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when not asked for."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in one datagram; True when it was handed to the socket.

        Values are flattened to one line (a newline would start a new field).
        """
        if self.address is None or not fields:
            return False
        message = "".join(f"{key}={_one_line(str(value))}\n" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never stall the event loop on a slow reader: a dropped ping is retried next period.
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), _sockaddr(self.address))
        except OSError as exc:
            if not self._failing:
                log.warning("sd_notify to %s failed (%s); systemd will not see status or watchdog pings "
                            "until it works again", self.address, exc)
                self._failing = True
            else:
                log.debug("sd_notify to %s failed again: %s", self.address, exc)
            return False
        if self._failing:
            log.info("sd_notify to %s works again", self.address)
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (with an optional STATUS=): start-up or a reload has finished."""
        return self.send(READY=1, STATUS=status) if status is not None else self.send(READY=1)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload (systemd >= 253) requires."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.send(STOPPING=1, STATUS=status) if status is not None else self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """STATUS=: the one-line summary `systemctl status` shows."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the agent is alive."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def heartbeat(notifier: Notifier, status_fn: Callable[[], str] | None = None) -> None:
    """Ping the watchdog every half $WATCHDOG_USEC and keep STATUS= current, until cancelled.

    The pings come from this coroutine on the agent's event loop, not from a thread: if the
    loop is stuck (a blocking call, a busy loop), the pings stop and systemd restarts the agent,
    which is the point of the watchdog. STATUS= is sent when ``status_fn()`` changes.
    """
    if not notifier.enabled:
        return
    interval = notifier.watchdog_interval()
    period = interval if interval is not None else STATUS_PERIOD
    last_status: str | None = None
    failed_status = False
    while True:
        fields: dict[str, str | int] = {"WATCHDOG": 1} if interval is not None else {}
        if status_fn is not None:
            try:
                text = status_fn()
            except Exception as exc:
                # A broken summary must not stop the pings (that would restart a working agent).
                if not failed_status:
                    log.error("status summary failed: %r", exc, exc_info=exc)
                else:
                    log.debug("status summary failed again: %r", exc)
                failed_status = True
                text = f"status summary failed: {exc!r}"
            else:
                failed_status = False
            if text != last_status:
                fields["STATUS"] = last_status = text
        notifier.send(**fields)
        # After a stall the overdue timer fires at once: one ping, then the period again.
        await asyncio.sleep(period)


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. our parent)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _sockaddr(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
