"""Driver factories for tests: one in-memory fake device, and a recorder around the real drivers.

Both implement our own :class:`drivers.base.Driver` interface and are handed to the agent as its
``driver_factory`` (``Agent(config, driver_factory=...)``); no library class is mocked.

:class:`FakePlant` holds the state of the fake devices for one test. The agent opens a new driver
on every (re)connect, so the state lives in the plant, not in a driver or a class variable: two
tests never share it, and a test reads and changes it through the plant it passed in::

    plant = FakePlant(default=5.0)
    agent = Agent(cfg, driver_factory=plant.driver)
    plant.device("dev").reachable = False      # the device goes away
    assert plant.device("dev").written == [("dev.sp", 7.5)]

:class:`WriteLog` wraps the real driver classes and records the call stack of every ``write``, so
a test can prove that writes came through the safety gate.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import drivers
from drivers.base import GOOD, Driver, Reading, ReadingSink, Value
from edge_agent.config import DeviceConfig
from edge_agent.errors import ConnectError, ReadError

ROOT = Path(__file__).resolve().parent.parent
GATE_FILE = ROOT / "edge_agent" / "control" / "gate.py"


class FakeDevice:
    """What the fake drivers of one configured device talk to.

    ``values`` is what the device holds, by point name: a read returns it (a point never set reads
    as ``default``, which it then holds), a write sets it. With ``counting`` every read first sets
    every point to the number of reads so far, so each sample is distinct and checkable.
    ``reachable = False`` refuses connections and fails reads. With ``accepts_writes = False`` a
    write fails the test: for agents that must never write. ``holds`` maps a written value to what
    the device keeps of it (default: all of it), for devices that cannot hold every value. A
    connection attempt waits until ``connect_open`` is set (it is, unless a test clears it: a slow
    device, still connecting while the rest of the agent is up).
    """

    def __init__(self, name: str, *, default: Value = None, counting: bool = False,
                 accepts_writes: bool = True) -> None:
        self.name = name
        self.values: dict[str, Value] = {}
        self.default = default
        self.counting = counting
        self.accepts_writes = accepts_writes
        self.reachable = True
        self.holds: Callable[[Any], Any] = lambda value: value
        self.connect_open = asyncio.Event()
        self.connect_open.set()
        self.connects = 0  # successful connections
        self.reads = 0  # successful reads
        self.written: list[tuple[str, Any]] = []  # (point, value) of every write, in order
        self.sinks: list[ReadingSink] = []  # subscribers of the connected drivers

    def readings(self, points: Iterable[str]) -> list[Reading]:
        """The current value of each point, good, stamped now."""
        now = time.time()
        return [Reading(name, self.values.setdefault(name, self.default), GOOD, now) for name in points]

    def push(self, values: dict[str, Value]) -> None:
        """Change values and report them to every subscribed driver's sink (subscribe mode)."""
        self.values.update(values)
        readings = self.readings(values)
        for sink in list(self.sinks):
            sink(readings)


class FakePlant:
    """The fake devices of one test, created on first use with the plant's defaults.

    ``unreachable_hosts``: a device configured with one of these hosts refuses to connect,
    whatever its name (a config that points a device somewhere else, e.g. pushed by a command).
    """

    def __init__(self, *, default: Value = None, counting: bool = False, accepts_writes: bool = True,
                 unreachable_hosts: Iterable[str] = ()) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.unreachable_hosts = set(unreachable_hosts)
        self._defaults: dict[str, Any] = {"default": default, "counting": counting,
                                          "accepts_writes": accepts_writes}

    def device(self, name: str) -> FakeDevice:
        if name not in self.devices:
            self.devices[name] = FakeDevice(name, **self._defaults)
        return self.devices[name]

    def driver(self, device: DeviceConfig, data_dir: Path) -> FakeDriver:
        """The agent's driver factory: a fresh driver for ``device``, on this plant's state."""
        return FakeDriver(device, data_dir, self)


class FakeDriver(Driver):
    """An in-memory driver for any configured device (configs use protocol "modbus" for it)."""

    protocol = "fake"
    supports_subscribe = True

    def __init__(self, device: DeviceConfig, data_dir: Path, plant: FakePlant) -> None:
        super().__init__(device, data_dir)
        self.plant = plant
        self.state = plant.device(device.name)
        self._sink: ReadingSink | None = None

    async def connect(self) -> None:
        host = getattr(self.device, "host", "")
        if host in self.plant.unreachable_hosts:
            raise ConnectError(self.device.name, f"{host} unreachable (test)")
        await self.state.connect_open.wait()
        if not self.state.reachable:
            raise ConnectError(self.device.name, "connection refused")
        self.state.connects += 1

    async def read(self) -> list[Reading]:
        if not self.state.reachable:
            raise ReadError(self.device.name, "no response")
        self.state.reads += 1
        if self.state.counting:
            self.state.values.update({p.name: float(self.state.reads) for p in self.device.points})
        return self.state.readings(p.name for p in self.device.points)

    async def write(self, point: str, value: Any) -> None:
        if not self.state.accepts_writes:
            raise AssertionError(f"{self.device.name}: this device is never written (write {point} = {value!r})")
        self.state.written.append((point, value))
        self.state.values[point] = float(self.state.holds(value))

    async def exact(self, point: str, value: Any) -> bool | int | float:
        """What the fake device keeps of ``value`` (as a float, bools aside)."""
        kept = self.state.holds(value)
        return kept if isinstance(kept, bool) else float(kept)

    async def subscribe(self, sink: ReadingSink) -> None:
        self._sink = sink
        self.state.sinks.append(sink)
        sink(self.state.readings(p.name for p in self.device.points))  # the initial values, like OPC UA

    async def check(self) -> None:
        if not self.state.reachable:
            raise ReadError(self.device.name, "no keep-alive")

    async def close(self) -> None:
        if self._sink is not None and self._sink in self.state.sinks:
            self.state.sinks.remove(self._sink)
        self._sink = None


class WriteLog:
    """Every driver write made in a test, with the stack it was called from."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, list[traceback.FrameSummary]]] = []

    def factory(self, device: DeviceConfig, data_dir: Path) -> Driver:
        """A DriverFactory: the registered driver class, subclassed to record its writes."""
        base = drivers.driver_class(device.protocol)
        calls = self.calls

        class Recording(base):  # type: ignore[valid-type, misc]
            async def write(self, point: str, value: Any) -> None:
                calls.append((point, value, traceback.extract_stack()[:-1]))
                await super().write(point, value)

        return Recording(device, data_dir)

    def assert_all_through_gate(self) -> None:
        """The frame that called each write is the safety gate's."""
        for point, value, stack in self.calls:
            caller = Path(stack[-1].filename).resolve()
            assert caller == GATE_FILE, (f"write {point} = {value} came from {caller}:{stack[-1].lineno}, "
                                         f"not the safety gate:\n{''.join(traceback.format_list(stack))}")
