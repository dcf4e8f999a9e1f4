"""Plain MQTT where the site chooses it (``mqtt.tls = false``), and a login over TLS without a client
certificate, against a real mosquitto with those listeners beside its mutual-TLS one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.agent import Agent
from edge_agent.errors import ConfigError
from tests import builders
from tests.fakes import FakePlant
from tests.helpers import wait_for
from tests.mqtt_broker import Broker, Pki, Recorder

USER, PASSWORD = "gw-plain", "s3cret-Pa55"
PREFIX = "edge/plant-a/gw-01"


@pytest.fixture
def login_broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    """mosquitto with its mutual-TLS listener, a plain listener and a TLS listener, both taking a login."""
    with Broker(pki, tmp_path / "mosquitto", logins={USER: PASSWORD}) as running:
        yield running


def _config(tmp_path: Path, mqtt: builders.Doc) -> config.AgentConfig:
    section = {"host": "127.0.0.1", "publish_interval": "100ms", "retry_min": "100ms", "retry_max": "300ms", **mqtt}
    doc = builders.config(tmp_path / "data", id="gw-01", site="plant-a", twin={"flush_interval": "50ms"},
                          mqtt=section, devices=[builders.modbus("dev", builders.numbered("dev.p", 2),
                                                                 interval="100ms")])
    return builders.load(doc, tmp_path / "agent.toml")


def test_tls_false_needs_no_ca_and_defaults_to_port_1883(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"tls": False})
    assert cfg.mqtt is not None and cfg.mqtt.tls is False
    assert cfg.mqtt.ca_file is None and cfg.mqtt.port == 1883
    assert _config(tmp_path, {"tls": False, "port": 11883}).mqtt.port == 11883  # type: ignore[union-attr]


def test_tls_keys_without_tls_and_tls_without_ca_are_errors(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, {"tls": False, "ca_file": pki.ca_cert, "tls_insecure": True})
    problems = "\n".join(caught.value.problems)
    assert "mqtt.ca_file: only applies with TLS, but tls = false" in problems
    assert "mqtt.tls_insecure: only applies with TLS" in problems
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, {})
    assert any(p.endswith("mqtt.ca_file: required, expected a string") for p in caught.value.problems)
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, {"tls": "no"})
    assert any("mqtt.tls: expected true or false" in p for p in caught.value.problems)


async def test_plain_mqtt_with_a_login_delivers_and_is_logged_loudly(tmp_path: Path, login_broker: Broker,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg = _config(tmp_path, {"tls": False, "port": login_broker.plain_port, "username": USER, "password": PASSWORD})
    with Recorder(login_broker, f"{PREFIX}/#") as recorder:  # listens on the mutual-TLS listener
        agent = Agent(cfg, driver_factory=FakePlant(counting=True).driver)
        await agent.start()
        try:
            telemetry = await recorder.wait_for_async(lambda msgs: [m.json() for m in msgs],
                                                      topic=f"{PREFIX}/telemetry")
            names = {p["name"] for p in telemetry[0]["points"]}
            assert telemetry[0]["gateway"] == "gw-01" and names and names <= {"dev.p0", "dev.p1"}
            state = await recorder.wait_for_async(lambda msgs: msgs, topic=f"{PREFIX}/state")
            assert state[-1].json()["state"] == "online"
        finally:
            await agent.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "mqtt.tls = false" in
                r.getMessage()]
    assert len(warnings) == 1 and "NOT encrypted" in warnings[0] and f"127.0.0.1:{login_broker.plain_port}" in \
        warnings[0] and "the password" in warnings[0], warnings
    assert any("plain TCP, not encrypted" in r.getMessage() for r in caplog.records)
    assert "New client connected from 127.0.0.1:" in login_broker.log() and f"u'{USER}'" in login_broker.log()


async def test_login_over_tls_without_a_client_certificate(tmp_path: Path, login_broker: Broker, pki: Pki) -> None:
    cfg = _config(tmp_path, {"host": "localhost", "port": login_broker.login_port, "ca_file": pki.ca_cert,
                             "username": USER, "password": PASSWORD})
    assert cfg.mqtt is not None and cfg.mqtt.tls and cfg.mqtt.cert_file is None
    with Recorder(login_broker, f"{PREFIX}/telemetry") as recorder:
        agent = Agent(cfg, driver_factory=FakePlant(counting=True).driver)
        await agent.start()
        try:
            received = await recorder.wait_for_async(lambda msgs: msgs)
            assert received[0].json()["points"][0]["name"].startswith("dev.p")
            assert agent.sync is not None and agent.sync.link.connected.is_set()
        finally:
            await agent.stop()


async def test_a_wrong_password_is_named_and_nothing_is_lost(tmp_path: Path, login_broker: Broker) -> None:
    cfg = _config(tmp_path, {"tls": False, "port": login_broker.plain_port, "username": USER, "password": "wrong"})
    agent = Agent(cfg, driver_factory=FakePlant(counting=True).driver)
    await agent.start()
    try:
        assert agent.sync is not None
        link = agent.sync.link
        error = await wait_for(lambda: link.last_error, what="a refused login")
        assert "refused the connection" in error and "mqtt.username/password" in error, error
        depth = await wait_for(lambda: agent.outbox is not None and agent.outbox.stats().depth >= 3,
                               what="telemetry kept in the outbox")
        assert depth and not link.connected.is_set()
    finally:
        await agent.stop()
