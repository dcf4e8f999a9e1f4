"""Agent supervision logic with a fake driver that implements our own Driver interface."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any, ClassVar

from drivers.base import Driver, Reading
from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.config import DeviceConfig
from edge_agent.errors import ConnectError, ReadError
from edge_agent.pacing import backoff
from edge_agent.store.views import TwinView
from tests.helpers import wait_for


class FakeDevice:
    """What a fake driver talks to: values, and a switch to take the device away."""

    def __init__(self) -> None:
        self.online = True
        self.values: dict[str, float] = {}
        self.connects = 0


class FakeDriver(Driver):
    protocol = "modbus"
    devices: ClassVar[dict[str, FakeDevice]] = {}

    def __init__(self, device: DeviceConfig, data_dir: Path) -> None:
        super().__init__(device, data_dir)
        self.plant = self.devices[device.name]

    async def connect(self) -> None:
        if not self.plant.online:
            raise ConnectError(self.device.name, "connection refused")
        self.plant.connects += 1

    async def read(self) -> list[Reading]:
        if not self.plant.online:
            raise ReadError(self.device.name, "no response")
        now = time.time()
        return [Reading(p.name, self.plant.values.get(p.name), "good", now) for p in self.device.points]

    async def write(self, point: str, value: Any) -> None:
        raise AssertionError("the agent itself never writes")

    async def close(self) -> None:
        pass


def _config(tmp_path: Path) -> config.AgentConfig:
    text = f"""
    [agent]
    id = "gw"
    data_dir = "{tmp_path}"
    [twin]
    flush_interval = "50ms"
    """
    for name in ("a", "b"):
        text += f"""
    [[devices]]
    name = "{name}"
    protocol = "modbus"
    host = "127.0.0.1"
    interval = "100ms"
    retry_min = "50ms"
    retry_max = "200ms"
      [[devices.points]]
      name = "{name}.x"
      address = 0
      type = "float32"
    """
    return config.loads(textwrap.dedent(text), tmp_path / "agent.toml")


def _history(agent: Agent, point: str) -> list[dict[str, Any]]:
    with TwinView.open(agent.config.twin_path) as twin:
        return twin.history(point, 0)


def _current(agent: Agent) -> dict[str, tuple[Any, str]]:
    with TwinView.open(agent.config.twin_path) as twin:
        return {r["name"]: (r["value"], r["quality"]) for r in twin.current()}


async def test_device_down_bad_then_stale_then_recovers_others_unaffected(tmp_path: Path) -> None:
    FakeDriver.devices = {"a": FakeDevice(), "b": FakeDevice()}
    FakeDriver.devices["a"].values["a.x"] = 1.5
    FakeDriver.devices["b"].values["b.x"] = 2.5
    agent = Agent(_config(tmp_path), driver_factory=FakeDriver)
    await agent.start()
    try:
        await wait_for(lambda: _current(agent) == {"a.x": (1.5, "good"), "b.x": (2.5, "good")}, what="mirror")
        FakeDriver.devices["a"].online = False
        FakeDriver.devices["b"].values["b.x"] = 3.5
        # bad at the first failure, stale after three intervals: the bad spell is short, so it
        # is checked in the history rather than caught in the current value
        await wait_for(lambda: _current(agent)["a.x"] == (1.5, "stale"), what="a stale after 3 intervals")
        assert (1.5, "bad") in [(r["value"], r["quality"]) for r in _history(agent, "a.x")]
        await wait_for(lambda: _current(agent)["b.x"] == (3.5, "good"), what="b unaffected")
        assert agent.runners["a"].status.state == "down"
        assert agent.runners["a"].status.last_error == 'device "a": connection refused'
        FakeDriver.devices["a"].online = True
        FakeDriver.devices["a"].values["a.x"] = 4.5
        await wait_for(lambda: _current(agent)["a.x"] == (4.5, "good"), what="a recovered")
        assert agent.runners["a"].status.state == "up"
        qualities = [r["quality"] for r in _history(agent, "a.x")]
        assert qualities[0] == "good" and "bad" in qualities and "stale" in qualities and qualities[-1] == "good"
        assert qualities.index("bad") < qualities.index("stale")
    finally:
        await agent.stop()


async def test_device_missing_at_start_does_not_block_others(tmp_path: Path) -> None:
    FakeDriver.devices = {"a": FakeDevice(), "b": FakeDevice()}
    FakeDriver.devices["a"].online = False
    FakeDriver.devices["b"].values["b.x"] = 7.0
    agent = Agent(_config(tmp_path), driver_factory=FakeDriver)
    await agent.start()
    try:
        await wait_for(lambda: _current(agent)["b.x"] == (7.0, "good"), what="b mirrored")
        await wait_for(lambda: _current(agent)["a.x"][1] in ("bad", "stale"), what="a marked bad")
        assert _current(agent)["a.x"][0] is None
    finally:
        await agent.stop()


async def test_stop_flushes_pending_readings(tmp_path: Path) -> None:
    FakeDriver.devices = {"a": FakeDevice(), "b": FakeDevice()}
    agent = Agent(_config(tmp_path), driver_factory=FakeDriver)
    await agent.start()
    await wait_for(lambda: agent.stored > 0, what="first flush")
    agent.submit([Reading("a.x", 99.0, "good", time.time())])
    await agent.stop()
    twin = TwinView.open(tmp_path / "twin.db")
    assert {r["name"]: r["value"] for r in twin.current()}["a.x"] == 99.0
    twin.close()


def test_backoff_is_capped_and_jittered() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff(n, 1.0, 60.0, rng) for n in range(12)]
    assert all(0.5 <= d <= 1.0 for d in delays[:1])
    assert all(d <= 60.0 for d in delays)
    assert max(delays) >= 30.0  # it does grow to the cap
    assert len({round(d, 6) for d in delays}) == len(delays)  # jitter: no two alike


async def test_metrics_endpoint_serves_prometheus_text(tmp_path: Path) -> None:
    import asyncio
    import dataclasses

    from edge_agent.config import MetricsSection
    from tests.helpers import free_port

    FakeDriver.devices = {"a": FakeDevice(), "b": FakeDevice()}
    FakeDriver.devices["b"].online = False
    port = free_port()
    cfg = dataclasses.replace(_config(tmp_path), metrics=MetricsSection(enabled=True, port=port))
    agent = Agent(cfg, driver_factory=FakeDriver)
    await agent.start()

    async def get(path: str) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        return data.decode()

    try:
        await wait_for(lambda: agent.stored > 0 and agent.runners["b"].status.read_errors > 0, what="reads")
        text = await get("/metrics")
        assert text.startswith("HTTP/1.1 200 OK")
        body = text.split("\r\n\r\n", 1)[1]
        samples = dict(line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
        assert samples['edge_agent_device_up{device="a"}'] == "1"
        assert samples['edge_agent_device_up{device="b"}'] == "0"
        assert int(samples['edge_agent_device_read_errors_total{device="b"}']) >= 1
        assert int(samples["edge_agent_history_rows_total"]) > 0
        assert "# TYPE edge_agent_points_read_total counter" in body
        assert (await get("/nope")).startswith("HTTP/1.1 404")
    finally:
        await agent.stop()
