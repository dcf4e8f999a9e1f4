"""Signed remote commands for the tests: keys, envelopes signed the documented way, an operator that
waits for its answers, and an agent with commands enabled against the fake device of tests/fakes.py.

Commands are signed here with ``cryptography`` directly (not this project's code), published through
a real broker by a :class:`tests.mqtt_broker.Recorder`, and each answer is awaited on the request's
own Response Topic and matched by Correlation Data.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.store.views import TwinView
from tests import builders
from tests.fakes import FakePlant
from tests.helpers import wait_for
from tests.mqtt_broker import AGENT_CN, Broker, Message, Pki, Recorder, publish_properties

PREFIX = "edge/plant-a/gw-01"
CMD, RESPONSE, EVENTS = f"{PREFIX}/cmd", f"{PREFIX}/cmd/response", f"{PREFIX}/events"
UNREACHABLE = "10.255.255.1"  # a device host the fake driver refuses to connect to
_ids = itertools.count(1)


def fake_plant() -> FakePlant:
    """Setpoint dev.sp and measurement dev.pv held in memory, 5.0 until written; a device configured
    at UNREACHABLE refuses to connect."""
    return FakePlant(default=5.0, unreachable_hosts={UNREACHABLE})


@dataclass
class Keys:
    directory: Path
    private: dict[str, Ed25519PrivateKey]


def make_keys(tmp_path: Path) -> Keys:
    """Key pairs for alice, bob, carol and mallory; the public keys in ``tmp_path/keys``."""
    directory = tmp_path / "keys"
    directory.mkdir()
    private = {}
    for name in ("alice", "bob", "carol", "mallory"):
        key = Ed25519PrivateKey.generate()
        private[name] = key
        (directory / f"{name}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Keys(directory, private)


def config_text(tmp_path: Path, broker: Broker, pki: Pki, keys: Keys, *, host: str = "127.0.0.1",
                interval: str = "100ms", site: str = "plant-a", admin_role: str = "admin",
                models: Sequence[builders.Doc] = (), operator: tuple[str, str, Path] | None = None,
                max_payload: str = "64KiB") -> str:
    """The agent's config: the broker, three operators (alice admin, bob operator, carol viewer, plus
    ``operator``), and device dev with setpoint dev.sp (0..20, steps of at most 5) and dev.pv."""
    operators = [builders.operator("alice", admin_role, keys.directory / "alice.pub"),
                 builders.operator("bob", "operator", keys.directory / "bob.pub"),
                 builders.operator("carol", "viewer", keys.directory / "carol.pub")]
    if operator is not None:
        operators.append(builders.operator(*operator))
    points = [builders.point("dev.sp", address=0, writable=True, min=0, max=20, max_step=5),
              builders.point("dev.pv", address=1)]
    dev = builders.modbus("dev", points, host=host, interval=interval, retry_min="100ms", retry_max="200ms")
    return builders.toml(builders.config(
        tmp_path / "data", id=AGENT_CN, site=site, twin={"flush_interval": "50ms"},
        mqtt=builders.mqtt(pki, broker.port, publish_interval="100ms", retry_min="100ms", retry_max="500ms"),
        commands=builders.commands(operators, clock_skew="5s", max_payload=max_payload, config_deadline="2s"),
        devices=[dev], models=models))


def write_config(tmp_path: Path, text: str) -> config.AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return config.loads(text, path)


def envelope(keys: Keys, operator: str, name: str, args: dict[str, Any] | None = None, *,
             signer: str | None = None, issued: float | None = None, validity: float = 60,
             command_id: str | None = None) -> dict[str, Any]:
    """A command signed the documented way, with ``cryptography`` directly (not this project's code)."""
    issued_at = int(time.time() if issued is None else issued)
    body = {"id": command_id or f"cmd-{next(_ids)}-{time.time_ns()}", "name": name, "args": args or {},
            "operator": operator, "issued_at": issued_at, "expires_at": issued_at + validity}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    body["sig"] = base64.b64encode(keys.private[signer or operator].sign(canonical)).decode()
    return body


class Operator:
    """Sends commands through the broker and waits for the answer on its own response topic."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def send(self, payload: bytes | dict[str, Any], *, reply: bool = True, timeout: float = 15) -> Message:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        correlation = f"corr-{next(_ids)}".encode()
        topic = f"{RESPONSE}/t{next(_ids)}" if reply else RESPONSE
        props = publish_properties(response_topic=topic if reply else None, correlation_data=correlation)
        # in a thread: waiting for the PUBACK must not hold up the agent running on this event loop
        await asyncio.to_thread(self.recorder.publish, CMD, data, properties=props)

        def answered(messages: list[Message]) -> Message | None:
            for m in messages:
                got = getattr(m.properties, "CorrelationData", None)
                if m.topic == topic and (not reply or got == correlation):
                    return m
            return None
        return await self.recorder.wait_for_async(answered, timeout=timeout)

    async def ask(self, payload: bytes | dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        answer: dict[str, Any] = (await self.send(payload, **kwargs)).json()
        return answer


async def audit_record(agent: Agent, recorder: Recorder, command_id: str | None, code: str) -> dict[str, Any]:
    """The command's audit record, in the twin and on the events topic."""
    twin = TwinView.open(agent.config.twin_path)

    def stored() -> dict[str, Any] | None:
        for event in twin.events():
            if event["kind"] == "command" and event["detail"].get("command_id") == command_id \
                    and event["state"] == code:
                return event
        return None

    event = await wait_for(stored, timeout=10, what=f"audit record of {command_id} ({code})")
    await recorder.wait_for_async(
        lambda ms: any(m.json().get("type") == "command" and m.json().get("command_id") == command_id
                       and m.json().get("state") == code for m in ms), timeout=10, topic=EVENTS)
    return event


async def started(tmp_path: Path, text: str, plant: FakePlant | None = None) -> Agent:
    """The agent on ``text`` (written to tmp_path/agent.toml) and ``plant``'s fake device, connected and up."""
    plant = plant or fake_plant()
    agent = Agent(write_config(tmp_path, text), driver_factory=plant.driver)
    await agent.start()
    assert agent.sync is not None
    link = agent.sync.link
    await wait_for(lambda: link.connected.is_set() and agent.runners["dev"].status.state == "up", timeout=15,
                   what="agent connected and device up")
    return agent
