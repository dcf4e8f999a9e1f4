"""Cloud sync against a real mosquitto with mutual TLS: online, outage, kill -9, limits, bad TLS."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any, ClassVar

from drivers.base import Driver, Reading
from edge_agent import config
from edge_agent.agent import Agent
from tests.mqtt_broker import AGENT_CN, Broker, Pki, Recorder, broker_fixture, pki_fixture  # noqa: F401

PREFIX = "edge/plant-a/gw-01"


class CountingDriver(Driver):
    """A device whose points count up by one every read: every sample is distinct and checkable."""

    protocol = "modbus"
    counter: ClassVar[int] = 0

    async def connect(self) -> None:
        pass

    async def read(self) -> list[Reading]:
        CountingDriver.counter += 1
        now = time.time()
        return [Reading(p.name, float(CountingDriver.counter), "good", now) for p in self.device.points]

    async def write(self, point: str, value: Any) -> None:
        raise AssertionError("never written")

    async def close(self) -> None:
        pass


def agent_config(tmp_path: Path, broker: Broker, pki: Pki, *, points: int = 3, extra: str = "",
                 cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> config.AgentConfig:
    text = f"""
    [agent]
    id = "{AGENT_CN}"
    site = "plant-a"
    data_dir = "{tmp_path / 'data'}"
    [twin]
    flush_interval = "50ms"
    [mqtt]
    host = "localhost"
    port = {broker.port}
    ca_file = "{ca or pki.ca_cert}"
    cert_file = "{cert or pki.agent_cert}"
    key_file = "{key or pki.agent_key}"
    publish_interval = "100ms"
    twin_interval = "200ms"
    retry_min = "100ms"
    retry_max = "500ms"
    {textwrap.dedent(extra)}
    [[devices]]
    name = "dev"
    protocol = "modbus"
    host = "127.0.0.1"
    interval = "100ms"
    """
    for i in range(points):
        text += f"""
      [[devices.points]]
      name = "dev.p{i}"
      address = {i}
    """
    return config.loads(textwrap.dedent(text), tmp_path / "agent.toml")


def telemetry(recorder: Recorder) -> list[dict[str, Any]]:
    return [m.json() for m in recorder.messages(f"{PREFIX}/telemetry")]


async def test_online_telemetry_seq_contiguous_values_equal_twin(tmp_path: Path, broker: Broker, pki: Pki) -> None:
    with Recorder(broker, f"{PREFIX}/#") as recorder:
        agent = Agent(agent_config(tmp_path, broker, pki), driver_factory=CountingDriver)
        await agent.start()
        try:
            await recorder.wait_for_async(lambda msgs: len([m for m in msgs if m.topic.endswith("/telemetry")]) >= 5,
                                          timeout=20)
            state = [m for m in recorder.messages(f"{PREFIX}/state")]
            assert state and state[0].json()["state"] == "online" and state[0].json()["gateway"] == AGENT_CN
            twin_msgs = recorder.messages(f"{PREFIX}/twin")
            assert twin_msgs and {p["name"] for p in twin_msgs[-1].json()["points"]} == {"dev.p0", "dev.p1", "dev.p2"}
        finally:
            await agent.stop()
        msgs = telemetry(recorder)
        seqs = [m["seq"] for m in msgs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert all(m["v"] == 1 and m["gateway"] == AGENT_CN for m in msgs)
        sent = [(p["name"], p["ts"], p["value"], p["quality"]) for m in msgs for p in m["points"]]
        from edge_agent.twin import Twin

        twin = Twin.open(tmp_path / "data" / "twin.db", readonly=True)
        stored = [(r["point"], r["ts"], r["value"], r["quality"]) for r in twin.db.query(
            "SELECT point, ts, value, quality FROM history ORDER BY rowid")]
        twin.close()
        assert sent == stored  # every sample the twin kept went out, in order, with equal values
        await recorder.wait_for_async(
            lambda ms: ms and json.loads(ms[-1].payload)["state"] == "offline", timeout=10, topic=f"{PREFIX}/state")
