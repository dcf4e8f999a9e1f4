"""Agent supervision logic with the fake driver (tests/fakes.py), which implements our own Driver interface."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from drivers.base import Driver, Reading
from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.config import DeviceConfig
from edge_agent.pacing import backoff, next_tick
from edge_agent.store.views import TwinView
from tests import builders
from tests.fakes import FakePlant
from tests.helpers import wait_for


def _config(tmp_path: Path, metrics: builders.Doc | None = None) -> config.AgentConfig:
    devices = [builders.modbus(name, [builders.point(f"{name}.x", address=0, type="float32")], interval="100ms",
                               retry_min="50ms", retry_max="200ms") for name in ("a", "b")]
    doc = builders.config(tmp_path, twin={"flush_interval": "50ms"}, metrics=metrics, devices=devices)
    return builders.load(doc, tmp_path / "agent.toml")


def _plant() -> FakePlant:
    """Devices a and b; the agent itself never writes."""
    return FakePlant(accepts_writes=False)


def _history(agent: Agent, point: str) -> list[dict[str, Any]]:
    with TwinView.open(agent.config.twin_path) as twin:
        return twin.history(point, 0)


def _current(agent: Agent) -> dict[str, tuple[Any, str]]:
    with TwinView.open(agent.config.twin_path) as twin:
        return {r["name"]: (r["value"], r["quality"]) for r in twin.current()}


async def test_device_down_bad_then_stale_then_recovers_others_unaffected(tmp_path: Path) -> None:
    plant = _plant()
    dev_a, dev_b = plant.device("a"), plant.device("b")
    dev_a.values["a.x"] = 1.5
    dev_b.values["b.x"] = 2.5
    agent = Agent(_config(tmp_path), driver_factory=plant.driver)
    await agent.start()
    try:
        await wait_for(lambda: _current(agent) == {"a.x": (1.5, "good"), "b.x": (2.5, "good")}, what="mirror")
        dev_a.reachable = False
        dev_b.values["b.x"] = 3.5
        # bad at the first failure, stale after three intervals: the bad spell is short, so it
        # is checked in the history rather than caught in the current value
        await wait_for(lambda: _current(agent)["a.x"] == (1.5, "stale"), what="a stale after 3 intervals")
        assert (1.5, "bad") in [(r["value"], r["quality"]) for r in _history(agent, "a.x")]
        await wait_for(lambda: _current(agent)["b.x"] == (3.5, "good"), what="b unaffected")
        assert agent.runners["a"].status.state == "down"
        assert agent.runners["a"].status.last_error == 'device "a": connection refused'
        dev_a.reachable = True
        dev_a.values["a.x"] = 4.5
        await wait_for(lambda: _current(agent)["a.x"] == (4.5, "good"), what="a recovered")
        assert agent.runners["a"].status.state == "up"
        qualities = [r["quality"] for r in _history(agent, "a.x")]
        assert qualities[0] == "good" and "bad" in qualities and "stale" in qualities and qualities[-1] == "good"
        assert qualities.index("bad") < qualities.index("stale")
    finally:
        await agent.stop()


async def test_device_missing_at_start_does_not_block_others(tmp_path: Path) -> None:
    plant = _plant()
    plant.device("a").reachable = False
    plant.device("b").values["b.x"] = 7.0
    agent = Agent(_config(tmp_path), driver_factory=plant.driver)
    await agent.start()
    try:
        await wait_for(lambda: _current(agent)["b.x"] == (7.0, "good"), what="b mirrored")
        await wait_for(lambda: _current(agent)["a.x"][1] in ("bad", "stale"), what="a marked bad")
        assert _current(agent)["a.x"][0] is None
    finally:
        await agent.stop()


async def test_stop_flushes_pending_readings(tmp_path: Path) -> None:
    agent = Agent(_config(tmp_path), driver_factory=_plant().driver)
    await agent.start()
    await wait_for(lambda: agent.stored > 0, what="first flush")
    agent.submit([Reading("a.x", 99.0, "good", time.time())])
    await agent.stop()
    twin = TwinView.open(tmp_path / "twin.db")
    assert {r["name"]: r["value"] for r in twin.current()}["a.x"] == 99.0
    twin.close()


async def test_subscribed_device_follows_pushes_and_goes_down_when_its_check_fails(tmp_path: Path) -> None:
    """Subscribe mode with the fake: values arrive as pushes (never polled), a failed check takes it down."""
    plant = _plant()
    dev = plant.device("c")
    dev.values["c.x"] = 1.0
    points = [builders.point("c.x", node="ns=1;s=X")]
    device = builders.opcua("c", "opc.tcp://127.0.0.1:4840", points, mode="subscribe", interval="100ms",
                            retry_min="50ms", retry_max="200ms")
    doc = builders.config(tmp_path, twin={"flush_interval": "50ms"}, devices=[device])
    agent = Agent(builders.load(doc, tmp_path / "agent.toml"), driver_factory=plant.driver)

    def latest() -> tuple[Any, str] | None:
        reading = agent.latest.get("c.x")
        return None if reading is None else (reading.value, reading.quality)

    await agent.start()
    try:
        await wait_for(lambda: latest() == (1.0, "good"), what="the value at subscription")
        dev.push({"c.x": 2.0})
        await wait_for(lambda: latest() == (2.0, "good"), what="the pushed value")
        assert dev.reads == 0 and len(dev.sinks) == 1
        dev.reachable = False
        await wait_for(lambda: agent.runners["c"].status.state == "down", what="down after a failed check")
        assert dev.sinks == []  # the driver was closed
        dev.reachable = True
        dev.values["c.x"] = 3.0
        await wait_for(lambda: latest() == (3.0, "good"), what="subscribed again")
        assert agent.runners["c"].status.state == "up" and dev.connects == 2

        def good() -> list[Any]:
            return [r["value"] for r in _history(agent, "c.x") if r["quality"] == "good"]

        await wait_for(lambda: good() == [1.0, 2.0, 3.0], what="every good value in the history")
    finally:
        await agent.stop()


async def test_a_quiet_devices_last_change_reaches_the_points_table(tmp_path: Path) -> None:
    """One pushed change and then silence: the points table (twin show) catches up within points_interval,
    not only at stop (the table is refreshed at most every points_interval, and the refresh used to
    wait for another reading to arrive)."""
    plant = _plant()
    dev = plant.device("c")
    dev.values["c.x"] = 1.0
    device = builders.opcua("c", "opc.tcp://127.0.0.1:4840", [builders.point("c.x", node="ns=1;s=X")],
                            mode="subscribe", interval="1s")
    doc = builders.config(tmp_path, twin={"flush_interval": "50ms", "points_interval": "300ms"}, devices=[device])
    agent = Agent(builders.load(doc, tmp_path / "agent.toml"), driver_factory=plant.driver)
    await agent.start()
    try:
        await wait_for(lambda: _current(agent).get("c.x") == (1.0, "good"), what="the first value in the table")
        dev.push({"c.x": 2.0})  # one change, nothing after it
        await wait_for(lambda: _current(agent).get("c.x") == (2.0, "good"), timeout=5,
                       what="the quiet device's change in the points table")
    finally:
        await agent.stop()


def test_backoff_is_capped_and_jittered() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff(n, 1.0, 60.0, rng) for n in range(12)]
    assert all(0.5 <= d <= 1.0 for d in delays[:1])
    assert all(d <= 60.0 for d in delays)
    assert max(delays) >= 30.0  # it does grow to the cap
    assert len({round(d, 6) for d in delays}) == len(delays)  # jitter: no two alike


class _Timed(Driver):
    """A driver whose reads take ``busy`` seconds and are logged with the loop time they began."""

    protocol = "timed"

    def __init__(self, device: DeviceConfig, data_dir: Path, starts: list[float], busy: float) -> None:
        super().__init__(device, data_dir)
        self.starts, self.busy = starts, busy

    async def connect(self) -> None:
        if self.device.name == "late":  # connected 30 ms after the others
            await asyncio.sleep(0.03)

    async def read(self) -> list[Reading]:
        self.starts.append(asyncio.get_running_loop().time())
        if self.busy:
            await asyncio.sleep(self.busy)
        return []

    async def write(self, point: str, value: Any) -> None:
        raise NotImplementedError

    async def exact(self, point: str, value: Any) -> float:
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def _poll_starts(busy: dict[str, float], interval: float, reads: int) -> dict[str, list[float]]:
    """Run a DeviceRunner per device name (``busy``: how long its reads take) until each read ``reads`` times."""
    from edge_agent.device import DeviceRunner

    starts: dict[str, list[float]] = {name: [] for name in busy}
    runners = [DeviceRunner(config.ModbusDevice(name=name, protocol="modbus", host="127.0.0.1", port=502,
                                                interval=interval, points=()),
                            Path("."), lambda readings: None, lambda point: None,
                            driver_factory=lambda d, folder: _Timed(d, folder, starts[d.name], busy[d.name]))
               for name in busy]
    tasks = [asyncio.create_task(runner.run()) for runner in runners]
    try:
        await wait_for(lambda: all(len(s) >= reads for s in starts.values()), timeout=20, what="the reads")
    finally:
        for runner, task in zip(runners, tasks, strict=True):
            runner.stop()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return starts


async def test_devices_of_one_interval_are_read_on_the_same_ticks() -> None:
    """After its first read, every device of an interval waits for the same shared tick: their reads
    start in the same turn of the loop (even for a device that connected later), a tick apart."""
    interval = 0.05
    starts = await _poll_starts({"a": 0.0, "late": 0.0}, interval, 8)
    ticks = {name: {int(t // interval): t for t in times[1:]} for name, times in starts.items()}
    assert len(ticks["a"]) == len(starts["a"]) - 1  # a tick apart: never two reads in one tick
    common = sorted(ticks["a"].keys() & ticks["late"].keys())
    assert len(common) >= 6 and set(ticks["late"]) <= set(ticks["a"])
    together = [abs(ticks["a"][tick] - ticks["late"][tick]) for tick in common]
    assert max(together) < 0.01  # one timer wakes both: the same turn of the loop


async def test_a_device_slower_than_its_interval_is_read_again_at_once() -> None:
    """A read that takes longer than the interval is followed by the next at once (the ticks it
    missed are skipped), not by a wait for the next tick: 60 ms reads every 50 ms come 60 ms apart."""
    starts = (await _poll_starts({"slow": 0.06}, 0.05, 8))["slow"]
    gaps = sorted(later - earlier for earlier, later in itertools.pairwise(starts))
    assert gaps[len(gaps) // 2] < 0.09  # waiting for the next tick would make them 100 ms apart


async def test_a_cancelled_wait_for_a_tick_leaves_the_other_waiters_be() -> None:
    first, second = next_tick(0.05), next_tick(0.05)
    first.cancel()
    await asyncio.wait_for(second, 2)
    assert first.cancelled() and second.result() is None


async def test_metrics_endpoint_serves_prometheus_text(tmp_path: Path) -> None:
    import asyncio

    from tests.helpers import free_port

    plant = _plant()
    plant.device("b").reachable = False
    port = free_port()
    cfg = _config(tmp_path, metrics={"enabled": True, "port": port})
    agent = Agent(cfg, driver_factory=plant.driver)
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
