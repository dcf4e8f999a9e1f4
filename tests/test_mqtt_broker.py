"""The test broker itself: mutual TLS, refused certificates, restart on the same port, the recorder."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from paho.mqtt.enums import MQTTProtocolVersion

import tests.mqtt_broker as mqtt_broker
from tests.helpers import wait_for_sync
from tests.mqtt_broker import (
    AGENT_CN,
    Broker,
    Pki,
    Recorder,
    publish_properties,
    try_connect,
)

TOPIC = "edge/site-a/gw-01/telemetry"


def test_pki_has_the_promised_certificates(pki: Pki) -> None:
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    expired = x509.load_pem_x509_certificate(pki.expired_cert.read_bytes())
    assert expired.not_valid_after_utc < dt.datetime.now(dt.UTC)
    agent = x509.load_pem_x509_certificate(pki.agent_cert.read_bytes())
    assert agent.subject.rfc4514_string() == f"CN={AGENT_CN}"
    assert agent.issuer == x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).subject
    assert pki.agent_key.stat().st_mode & 0o077 == 0


def test_recorder_receives_what_another_client_publishes(broker: Broker) -> None:
    with Recorder(broker, "edge/#") as recorder, \
            Recorder(broker, "unused/#", cert=broker.pki.agent_cert, key=broker.pki.agent_key) as agent:
        reason = agent.publish(TOPIC, b'{"seq": 1}', properties=publish_properties(user={"v": "1"}))
        agent.publish("elsewhere/x", b"not recorded")
        (message,) = recorder.wait_for(lambda ms: ms, topic=TOPIC)
    assert reason is not None and not reason.is_failure
    assert (message.topic, message.payload, message.qos, message.retain) == (TOPIC, b'{"seq": 1}', 1, False)
    assert message.json() == {"seq": 1}
    assert message.user_properties() == {"v": "1"}
    assert [m.topic for m in recorder.messages()] == [TOPIC]
    # use_identity_as_username: the broker knows the agent by its certificate's CN.
    assert f"u'{AGENT_CN}'" in broker.log()


def test_recorder_speaks_mqtt_3_1_1_too(broker: Broker) -> None:
    with Recorder(broker, "edge/#", protocol=MQTTProtocolVersion.MQTTv311) as recorder:
        recorder.publish(TOPIC, b"v3")
        (message,) = recorder.wait_for(lambda ms: ms)
    assert (message.payload, message.user_properties()) == (b"v3", {})
    assert "(p2," in broker.log()  # mosquitto logs its protocol enum: p2 is 3.1.1, p5 is 5


def test_retained_message_is_recorded_with_its_retain_flag(broker: Broker) -> None:
    with Recorder(broker, "unused") as publisher:
        publisher.publish("edge/site-a/gw-01/state", "online", retain=True)
    with Recorder(broker, "edge/+/+/state") as late:
        (message,) = late.wait_for(lambda ms: ms)
    assert (message.payload, message.retain) == (b"online", True)


def test_expired_client_certificate_is_refused_with_the_reason_under_tls_1_2(broker: Broker, pki: Pki) -> None:
    attempt = try_connect(broker, ca=pki.ca_cert, cert=pki.expired_cert, key=pki.expired_key,
                          tls_max=ssl.TLSVersion.TLSv1_2)
    assert isinstance(attempt.error, ssl.SSLError), attempt.describe()
    assert "certificate expired" in str(attempt.error), attempt.describe()
    assert not attempt.connected


def test_stranger_certificate_is_refused_as_unknown_ca_under_tls_1_2(broker: Broker, pki: Pki) -> None:
    attempt = try_connect(broker, ca=pki.ca_cert, cert=pki.stranger_cert, key=pki.stranger_key,
                          tls_max=ssl.TLSVersion.TLSv1_2)
    assert isinstance(attempt.error, ssl.SSLError), attempt.describe()
    assert "unknown ca" in str(attempt.error), attempt.describe()


@pytest.mark.parametrize("who", ["expired", "stranger", "no certificate"])
def test_refused_client_certificate_drops_the_link_under_tls_1_3(broker: Broker, pki: Pki, who: str) -> None:
    cert, key = {"expired": (pki.expired_cert, pki.expired_key), "stranger": (pki.stranger_cert, pki.stranger_key),
                 "no certificate": (None, None)}[who]
    attempt = try_connect(broker, ca=pki.ca_cert, cert=cert, key=key)
    # connect() itself succeeds; no CONNACK ever arrives, the broker closes the TLS link instead.
    assert attempt.error is None and attempt.reason is None and not attempt.connected, attempt.describe()
    assert any("failed to receive on socket" in line for line in attempt.log), attempt.describe()
    expected = "peer did not return a certificate" if cert is None else "certificate verify failed"
    wait_for_sync(lambda: expected in broker.log(), timeout=5, what=f"mosquitto to log {expected!r}")


def test_client_trusting_another_ca_fails_server_verification(broker: Broker, pki: Pki) -> None:
    attempt = try_connect(broker, ca=pki.other_ca_cert, cert=pki.agent_cert, key=pki.agent_key)
    assert isinstance(attempt.error, ssl.SSLCertVerificationError), attempt.describe()
    assert not attempt.connected


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_hostname_verification_accepts_both_names_of_the_server(broker: Broker, pki: Pki, host: str) -> None:
    attempt = try_connect(broker, ca=pki.ca_cert, cert=pki.agent_cert, key=pki.agent_key, host=host)
    assert attempt.connected and attempt.reason is not None and not attempt.reason.is_failure, attempt.describe()


def test_broker_restarts_on_the_same_port_and_the_recorder_resubscribes(broker: Broker) -> None:
    port = broker.port
    with Recorder(broker, "edge/#") as recorder:
        broker.stop()
        assert not broker.running
        wait_for_sync(lambda: not recorder.connected, timeout=5, what="the recorder to notice the outage")
        broker.start()
        assert broker.port == port
        recorder.wait_until_subscribed(2)
        with Recorder(broker, "unused", cert=broker.pki.agent_cert, key=broker.pki.agent_key) as agent:
            agent.publish(TOPIC, b"after restart")
        messages = recorder.wait_for(lambda ms: ms, topic=TOPIC)
    assert [m.payload for m in messages] == [b"after restart"]


def test_start_failure_reports_mosquittos_log(pki: Pki, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = Broker(pki, tmp_path, port=squatter.getsockname()[1])
        with pytest.raises(RuntimeError, match="Address already in use"):
            taken.start()
    assert not taken.running


def test_missing_mosquitto_fails_under_ci_and_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(mqtt_broker, "FALLBACK_BINARY", "/nonexistent/mosquitto")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="failure, not a skip"):
        mqtt_broker.mosquitto_binary()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"\./dev\.sh test"):
        mqtt_broker.mosquitto_binary()
