"""Small helpers shared by the tests: free ports, waiting on conditions with a deadline, the sd_notify
receiver, and running the real Agent against the simulated plant (start, stop, look inside)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from asyncua import Client

from drivers.base import GOOD
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.demo.plant import NAMESPACE_URI
from edge_agent.store.views import TwinView

if TYPE_CHECKING:
    from tests.fakes import WriteLog

T = TypeVar("T")
SPEED = 10.0  # simulated seconds per real second, for tests on the simulated plant (edge_agent.demo.plant)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for(condition: Callable[[], T | Awaitable[T]], timeout: float = 10.0,
                   interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        result = condition()
        last = await result if asyncio.iscoroutine(result) else result  # type: ignore[assignment]
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")
        await asyncio.sleep(interval)


def wait_for_sync(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
                  what: str = "condition") -> T:
    """Blocking version of :func:`wait_for` for tests that drive subprocesses."""
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")
        time.sleep(interval)


class NotifyReceiver:
    """Plays systemd's end of sd_notify: a bound datagram socket read by a thread, so it keeps
    receiving while a test blocks the event loop; each message is kept with its arrival time."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock, self.address = sock, address
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (arrival, fields)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def all(self) -> list[dict[str, str]]:
        return [fields for _, fields in list(self.messages)]

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [m for m in list(self.messages) if key in m[1]]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# ------------------------------------------------------------------ the agent on the simulated plant


@contextlib.asynccontextmanager
async def running(cfg: AgentConfig, writes: WriteLog, *, ready: tuple[str, ...] = ()) -> AsyncIterator[Agent]:
    """The real Agent, started with recording drivers, stopped on exit; waits for ``ready`` points good."""
    agent = Agent(cfg, driver_factory=writes.factory)
    await agent.start()
    try:
        for name in ready:
            await wait_for(lambda n=name: _good(agent, n), timeout=20, what=f"{name} good")
        yield agent
    finally:
        await agent.stop()


def _good(agent: Agent, name: str) -> bool:
    """Good, and its device up: after a restart the twin's last values are good before the device
    has connected, and a write then would find it not connected."""
    reading = agent.latest.get(name)
    owner = next((device.name for device, point in agent.config.points() if point.name == name), None)
    runner = agent.runners.get(owner) if owner is not None else None
    device_up = runner is None or runner.status.state == "up"
    return reading is not None and reading.quality == GOOD and reading.value is not None and device_up


def reader(cfg: AgentConfig) -> TwinView:
    """A read-only connection to the agent's twin, like the CLI's."""
    return TwinView.open(cfg.twin_path)


async def opcua_setpoint(endpoint: str) -> float:
    """The chiller setpoint as a separate OPC UA client sees it on the server."""
    async with Client(endpoint, timeout=5) as client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        return float(await client.get_node(f"ns={ns};s=Chiller1.Setpoint").read_value())
