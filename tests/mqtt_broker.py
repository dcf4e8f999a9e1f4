"""A real mosquitto broker with mutual TLS for the tests, and a subscriber that records every message.

A test asks for the ``pki`` and ``broker`` fixtures (tests/conftest.py) by name and imports the
classes from here::

    from tests.mqtt_broker import Broker, Recorder

    def test_something(broker: Broker) -> None:
        with Recorder(broker, "edge/#") as recorder:
            ...

``pki`` is generated once per session (EC P-256, so it takes milliseconds); ``broker`` is a fresh
mosquitto on a free port for every test. mosquitto comes from the system package: ``./dev.sh test``
installs it. When it is missing, CI fails (a missing broker there is a broken setup, never a skip)
and a local run skips with a hint.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.helpers import free_port, wait_for
from tests.unavailable import unavailable

T = TypeVar("T")

AGENT_CN = "gw-01"
OPERATOR_CN = "operator"
FALLBACK_BINARY = "/usr/sbin/mosquitto"  # Debian installs it outside a normal user's PATH

# --------------------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    """PEM files of a throwaway PKI: one CA, a server cert for localhost, client certs, and traps.

    ``agent_*`` (CN gw-01) and ``operator_*`` (CN operator) are valid client certs; ``expired_*`` is a
    client cert of the right CA whose validity ended yesterday; ``other_ca_*`` is an unrelated CA and
    ``stranger_*`` a client cert it signed. The broker takes the CN as the MQTT username.
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    agent_cert: Path
    agent_key: Path
    operator_cert: Path
    operator_key: Path
    expired_cert: Path
    expired_key: Path
    other_ca_cert: Path
    other_ca_key: Path
    stranger_cert: Path
    stranger_key: Path

    def issue_client(self, common_name: str, *, expired: bool = False) -> tuple[Path, Path]:
        """Another client cert signed by the test CA; returns (cert, key) paths."""
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        return _issue(self.directory, common_name, _client_extensions(), (ca_cert, ca_key), expired=expired)


def make_pki(directory: Path) -> Pki:
    """Generate every certificate and key :class:`Pki` names under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "edge-agent test CA", "ca")
    other = _make_ca(directory, "unrelated test CA", "other-ca")
    server = _issue(directory, "localhost", _server_extensions(), ca)
    agent = _issue(directory, AGENT_CN, _client_extensions(), ca)
    operator = _issue(directory, OPERATOR_CN, _client_extensions(), ca)
    expired = _issue(directory, "expired", _client_extensions(), ca, expired=True)
    stranger = _issue(directory, "stranger", _client_extensions(), other)
    return Pki(directory, directory / "ca.crt", directory / "ca.key", *server, *agent, *operator, *expired,
               directory / "other-ca.crt", directory / "other-ca.key", *stranger)


_Signer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
_Extensions = list[tuple[x509.ExtensionType, bool]]


def _make_ca(directory: Path, common_name: str, stem: str) -> _Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory, stem, cert, key)
    return cert, key


def _server_extensions() -> _Extensions:
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return [(x509.SubjectAlternativeName(names), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)]


def _client_extensions() -> _Extensions:
    return [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]


def _issue(directory: Path, common_name: str, extensions: _Extensions, signer: _Signer, *,
           expired: bool = False) -> tuple[Path, Path]:
    ca_cert, ca_key = signer
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=3), now - dt.timedelta(days=1)) if expired else (
        now - dt.timedelta(days=1), now + dt.timedelta(days=30))
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    stem = "server" if common_name == "localhost" else f"client-{common_name}"
    return _write(directory, stem, builder.sign(ca_key, hashes.SHA256()), key)


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


# ------------------------------------------------------------------------------------------ broker


def mosquitto_binary() -> str:
    """The mosquitto executable; fails under CI and skips locally when it is not installed."""
    found = shutil.which("mosquitto") or (FALLBACK_BINARY if os.access(FALLBACK_BINARY, os.X_OK) else None)
    if found:
        return found
    unavailable("mosquitto is not installed; ./dev.sh test installs it (apt-get install mosquitto)")


class Broker:
    """A mosquitto subprocess with one mutual-TLS listener on 127.0.0.1:``port``.

    ``start()`` after ``stop()`` reuses the same port and config, so a test can take the cloud away
    and bring it back. Without ``persistence`` a restart forgets sessions and retained messages.
    """

    host = "127.0.0.1"

    def __init__(self, pki: Pki, directory: Path, *, port: int | None = None, persistence: bool = False,
                 verbose: bool = False, logins: dict[str, str] | None = None) -> None:
        self.pki = pki
        self.directory = directory
        self.port = port or free_port()
        self.binary = mosquitto_binary()
        self.conf_path = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        # With ``logins`` (user -> password) the broker has two more listeners for those users: plain
        # MQTT on ``plain_port`` and TLS without a client certificate on ``login_port``.
        self.logins = dict(logins or {})
        self.plain_port = free_port() if logins else None
        self.login_port = free_port() if logins else None
        self.conf_path.write_text(self._config(persistence, verbose) + self._login_listeners())

    def _config(self, persistence: bool, verbose: bool) -> str:
        lines = [
            # Running as root, mosquitto would drop to the "mosquitto" user, which cannot read the tmp dir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            *(["per_listener_settings true"] if self.logins else []),
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.directory}/",
            "log_dest stderr",
            "log_type all" if verbose else "log_type error\nlog_type warning\nlog_type notice\nlog_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            "max_inflight_messages 0",  # 0 = unlimited: the tests measure the agent, not broker throttling
            "max_queued_messages 0",
            "set_tcp_nodelay true",
            f"listener {self.port} {self.host}",
            f"cafile {self.pki.ca_cert}",
            f"certfile {self.pki.server_cert}",
            f"keyfile {self.pki.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",  # mosquitto >= 2.0: the minimum version, TLS 1.3 stays allowed
            "allow_anonymous false",
        ]
        return "\n".join(lines) + "\n"

    def _login_listeners(self) -> str:
        if not self.logins:
            return ""
        passwords = self.directory / "passwords"
        passwords.write_text("")
        for user, password in self.logins.items():
            subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True,
                           capture_output=True, timeout=30)
        passwords.chmod(0o600)
        # per_listener_settings: the certificate listener keeps its identity-as-username, these two take logins
        return "\n".join([
            f"listener {self.plain_port} {self.host}", "allow_anonymous false", f"password_file {passwords}",
            f"listener {self.login_port} {self.host}", f"cafile {self.pki.ca_cert}",
            f"certfile {self.pki.server_cert}", f"keyfile {self.pki.server_key}", "require_certificate false",
            "tls_version tlsv1.2", "allow_anonymous false", f"password_file {passwords}",
        ]) + "\n"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """Everything mosquitto wrote so far, across restarts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and return once the listener completes a TLS handshake."""
        if self.running:
            raise RuntimeError(f"mosquitto is already running on port {self.port}")
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._accepts_tls():
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise RuntimeError(f"mosquitto exited with status {code} on port {self.port}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not accept TLS on port {self.port} within {timeout}s:\n"
                                   f"{self.log()}")
            time.sleep(0.02)

    def _accepts_tls(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(self.pki.operator_cert, self.pki.operator_key)
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.unwrap()  # a clean close_notify, so the probe leaves no OpenSSL error in the log
                return True
        except OSError:  # refused while starting; ssl.SSLError is an OSError too
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if mosquitto has not exited within ``timeout`` s. Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Message:
    """One message as the recorder received it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    received_at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.payload)

    def user_properties(self) -> dict[str, str]:
        return dict(getattr(self.properties, "UserProperty", []) or [])


def publish_properties(*, response_topic: str | None = None, correlation_data: bytes | None = None,
                       user: dict[str, str] | None = None) -> Properties:
    """MQTT 5 PUBLISH properties for :meth:`Recorder.publish` (request/response commands)."""
    properties = Properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        properties.ResponseTopic = response_topic
    if correlation_data is not None:
        properties.CorrelationData = correlation_data
    if user:
        properties.UserProperty = list(user.items())
    return properties


_client_ids = iter(range(1, 1_000_000))


def tls_client(client_id: str, *, ca: Path, cert: Path | None, key: Path | None,
               protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
               tls_max: ssl.TLSVersion | None = None) -> mqtt.Client:
    """A paho 2.x client (callback API v2) with TLS and hostname verification configured.

    ``tls_max=ssl.TLSVersion.TLSv1_2`` makes a refused client certificate fail inside ``connect()``
    with the broker's alert (see :func:`try_connect`).
    """
    context = ssl.create_default_context(cafile=str(ca))  # CERT_REQUIRED and check_hostname on
    if cert is not None:
        context.load_cert_chain(cert, key)
    if tls_max is not None:
        context.maximum_version = tls_max
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    client.tls_set_context(context)
    return client


class Recorder:
    """A TLS subscriber (paho in its own thread) that records every message on ``topic_filter``.

    It resubscribes after every reconnect, so it survives a broker restart; ``subscriptions``
    counts SUBACKs, so a test can wait for the resubscription. Also publishes with QoS 1.
    """

    def __init__(self, broker: Broker, topic_filter: str = "#", *, cert: Path | None = None, key: Path | None = None,
                 client_id: str | None = None, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> None:
        self.broker = broker
        self.topic_filter = topic_filter
        self.client_id = client_id or f"recorder-{next(_client_ids)}"
        self._client = tls_client(self.client_id, ca=broker.pki.ca_cert, cert=cert or broker.pki.operator_cert,
                                  key=key or broker.pki.operator_key, protocol=protocol)
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._changed = threading.Condition()
        self._messages: list[Message] = []
        self._acks: dict[int, ReasonCode] = {}
        self.subscriptions = 0
        self.errors: list[str] = []

    # paho callbacks, on paho's thread
    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode,
                    _properties: Properties | None) -> None:
        if reason.is_failure:
            self._note_error(f"CONNACK refused: {reason}")
        else:
            client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[ReasonCode],
                      _properties: Properties | None) -> None:
        with self._changed:
            failed = [str(reason) for reason in reasons if reason.is_failure]
            if failed:
                self.errors.append(f"SUBACK refused {self.topic_filter!r}: {failed}")
            else:
                self.subscriptions += 1
            self._changed.notify_all()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), getattr(msg, "properties", None))
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode,
                    _properties: Properties) -> None:
        with self._changed:
            self._acks[mid] = reason
            self._changed.notify_all()

    def _note_error(self, text: str) -> None:
        with self._changed:
            self.errors.append(text)
            self._changed.notify_all()

    def _wait(self, condition: Callable[[], T], timeout: float, what: str) -> T:
        with self._changed:
            result = self._changed.wait_for(condition, timeout)
        if not result:
            raise AssertionError(f"{self.client_id}: timed out after {timeout}s waiting for {what}; "
                                 f"errors {self.errors}; {len(self._messages)} messages recorded")
        return result

    # public API, on the test's thread
    def connect(self, timeout: float = 10.0) -> Recorder:
        """Connect (the TLS handshake raises here), subscribe, and wait for the SUBACK."""
        self._client.connect(self.broker.host, self.broker.port, keepalive=30)
        self._client.loop_start()
        try:
            self._wait(lambda: self.subscriptions > 0 or self.errors, timeout, f"SUBACK for {self.topic_filter!r}")
            if self.errors:
                raise AssertionError(f"{self.client_id}: {self.errors}")
        except BaseException:
            self.close()  # do not leave paho's thread running behind a failed test
            raise
        return self

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def messages(self, topic: str | None = None) -> list[Message]:
        """A snapshot of the messages so far, optionally only those matching a topic or filter."""
        with self._changed:
            recorded = list(self._messages)
        return [m for m in recorded if topic is None or mqtt.topic_matches_sub(topic, m.topic)]

    def clear(self) -> None:
        with self._changed:
            self._messages.clear()

    def wait_for(self, predicate: Callable[[list[Message]], T], timeout: float = 10.0,
                 topic: str | None = None) -> T:
        """Block until ``predicate(messages(topic))`` is truthy and return its value."""
        return self._wait(lambda: predicate(self.messages(topic)), timeout, f"messages on {topic or '#'}")

    async def wait_for_async(self, predicate: Callable[[list[Message]], T], timeout: float = 10.0,
                             topic: str | None = None) -> T:
        """:meth:`wait_for` for ``async def`` tests: polls, so the event loop (and an in-process agent) runs."""
        return await wait_for(lambda: predicate(self.messages(topic)), timeout, what=f"messages on {topic or '#'}")

    def wait_until_subscribed(self, count: int, timeout: float = 10.0) -> None:
        """Wait for the ``count``-th SUBACK (2 = resubscribed after the first reconnect)."""
        self._wait(lambda: self.subscriptions >= count, timeout, f"SUBACK number {count}")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                properties: Properties | None = None, timeout: float = 10.0) -> ReasonCode | None:
        """Publish and, for QoS 1/2, wait for the broker's acknowledgement; returns its reason code."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise AssertionError(f"{self.client_id}: publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return None
        self._wait(lambda: info.mid in self._acks, timeout, f"PUBACK for mid {info.mid}")
        with self._changed:
            reason = self._acks.pop(info.mid)
        if reason.is_failure:
            raise AssertionError(f"{self.client_id}: broker refused publish to {topic}: {reason}")
        return reason

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Recorder:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Attempt:
    """How a one-off connection attempt ended: an exception while connecting, a CONNACK, or a dropped link."""

    connected: bool
    error: BaseException | None = None
    reason: ReasonCode | None = None
    log: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"connected={self.connected} error={self.error!r} reason={self.reason} log={self.log}"


def try_connect(broker: Broker, *, ca: Path, cert: Path | None, key: Path | None, host: str | None = None,
                tls_max: ssl.TLSVersion | None = None, timeout: float = 5.0) -> Attempt:
    """Connect once without retrying and report what happened (for refused-certificate tests).

    A server the client does not trust always fails inside ``connect()`` (``attempt.error``). A client
    certificate the broker refuses depends on the TLS version: with TLS 1.2 the broker's alert
    ("certificate expired", "unknown ca") is raised by ``connect()``; with TLS 1.3 the client's side of
    the handshake is already over when the broker checks its certificate, so ``connect()`` returns,
    the link drops after CONNECT, and paho logs (in ``attempt.log``) usually only "EOF occurred in
    violation of protocol", only sometimes the alert itself.
    """
    client = tls_client(f"probe-{next(_client_ids)}", ca=ca, cert=cert, key=key, tls_max=tls_max)
    attempt = Attempt(connected=False)

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None) -> None:
        attempt.connected, attempt.reason = not reason.is_failure, reason

    client.on_connect = on_connect
    client.on_log = lambda _c, _u, _level, text: attempt.log.append(text)
    try:
        client.connect(host or broker.host, broker.port, keepalive=10)
    except OSError as exc:  # ssl.SSLError and its subclasses included
        attempt.error = exc
        return attempt
    deadline = time.monotonic() + timeout
    while attempt.reason is None and time.monotonic() < deadline:
        if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            break  # the broker dropped the link; the reason is in attempt.log
    client.disconnect()
    return attempt
