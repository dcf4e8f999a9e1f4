"""The MQTT connection: paho-mqtt 2.x driven from the asyncio event loop, over TLS (or plain TCP where
the site sets ``mqtt.tls = false``).

paho's socket is registered with the event loop (``add_reader``/``add_writer``) so no network
thread runs; only the blocking TCP connect and TLS handshake go to the default executor. The
link reconnects forever with capped exponential backoff and jitter, and says plainly why a
connection failed (certificate not trusted, client certificate refused, login refused, ...).

This module only moves packets. What is published, and when, is the outbox's business
(see :mod:`edge_agent.cloud.sync`): nothing else calls :meth:`MqttLink.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttSection
from edge_agent.errors import LinkError
from edge_agent.pacing import backoff

log = logging.getLogger(__name__)


OnMessage = Callable[[paho.MQTTMessage], None]
# The Will's payload, fixed, or made afresh before every CONNECT (a Sparkplug NDEATH carries a new bdSeq each time).
WillPayload = bytes | Callable[[], Awaitable[bytes]]


def tls_context(cfg: MqttSection) -> ssl.SSLContext:
    """TLS 1.2+ with the configured CA, and the client certificate when mutual TLS is set up."""
    if cfg.ca_file is None:
        raise LinkError("mqtt.ca_file is required with TLS")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise LinkError(f"mqtt.ca_file {cfg.ca_file}: cannot load the CA certificate: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"mqtt.cert_file {cfg.cert_file} / mqtt.key_file {cfg.key_file}: cannot load the "
                            f"client certificate and key: {exc}") from exc
    if cfg.tls_insecure:
        context.check_hostname = False
    return context


def check_client_certificate(cfg: MqttSection, now: float | None = None) -> None:
    """Raise LinkError when our own client certificate is expired or not yet valid.

    Under TLS 1.3 a broker rejects a client certificate after the client's side of the handshake
    is done, so the client often sees only "connection lost"; checking the dates ourselves gives
    the operator the real reason and the file to replace.
    """
    if cfg.cert_file is None:
        return
    try:
        cert = x509.load_pem_x509_certificate(cfg.cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise LinkError(f"mqtt.cert_file {cfg.cert_file}: cannot read the client certificate: {exc}") from exc
    moment = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    if cert.not_valid_after_utc < moment:
        raise LinkError(f"mqtt.cert_file {cfg.cert_file}: our client certificate expired on "
                        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; the broker will refuse it; install a new one")
    if cert.not_valid_before_utc > moment:
        raise LinkError(f"mqtt.cert_file {cfg.cert_file}: our client certificate is not valid before "
                        f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the gateway's clock)")


def explain(exc: BaseException, cfg: MqttSection) -> str:
    """A one-line, plant-engineer-readable reason for a failed connection."""
    where = f"{cfg.host}:{cfg.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"broker {where}: its certificate is not trusted ({exc.verify_message}); "
                f"check mqtt.ca_file {cfg.ca_file} and mqtt.host")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "CERTIFICATE_EXPIRED" in reason.upper():
            return f"broker {where} refused our client certificate {cfg.cert_file}: it has expired"
        if "CERTIFICATE" in reason.upper() or "UNKNOWN_CA" in reason.upper():
            return (f"broker {where} refused our client certificate {cfg.cert_file} during the TLS handshake "
                    f"({reason})")
        return f"broker {where}: TLS handshake failed ({reason})"
    if isinstance(exc, ConnectionRefusedError):
        return f"broker {where}: connection refused (is the broker running?)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"broker {where}: no answer within {cfg.keepalive:g} s"
    if isinstance(exc, ConnectionResetError):
        return (f"broker {where} closed the connection during the handshake (often: it rejected our client "
                f"certificate {cfg.cert_file})")
    if isinstance(exc, OSError):
        return f"broker {where}: {exc.strerror or exc}"
    return f"broker {where}: {exc}"


class MqttLink:
    """One MQTT client connection, kept up for as long as :meth:`run` runs."""

    def __init__(self, cfg: MqttSection, *, will_topic: str, will_payload: WillPayload,
                 subscriptions: tuple[str, ...] = (), on_message: OnMessage | None = None,
                 will_retain: bool = True, client_id: str | None = None, name: str = "mqtt",
                 max_packet: int | None = None) -> None:
        self.cfg = cfg
        # MQTT 5 Maximum Packet Size: the broker drops bigger messages for us instead of sending them
        self.max_packet = max_packet
        self.will_topic = will_topic
        self.will_payload = will_payload
        self.will_retain = will_retain
        self.client_id = client_id or cfg.client_id
        self.name = name  # how the logs call this connection ("mqtt", "sparkplug")
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.connected = asyncio.Event()
        self.last_error = ""
        self.connects = 0
        self.on_ack: Callable[[int], None] = lambda mid: None
        # A message the broker refused: True when the owner dropped it, so the link stays up.
        self.on_refused: Callable[[int], bool] = lambda mid: False
        self.on_up: Callable[[], None] = lambda: None
        self._client: paho.Client | None = None
        self._disconnected: asyncio.Event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rng = random.Random()
        self._down_since: float | None = None

    # ------------------------------------------------------------------ client setup

    def _new_client(self, will: bytes) -> paho.Client:
        cfg = self.cfg
        protocol = paho.MQTTv5 if cfg.version == "5" else paho.MQTTv311
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
                             clean_session=None if protocol == paho.MQTTv5 else True)
        if cfg.tls:
            client.tls_set_context(tls_context(cfg))
            if cfg.tls_insecure:
                client.tls_insecure_set(True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        client.will_set(self.will_topic, will, qos=1, retain=self.will_retain)
        # Our outbox limits what is in flight; paho must never queue or refuse on its own.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Connect, stay connected, reconnect after any failure; only cancellation ends it."""
        self._loop = asyncio.get_running_loop()
        if not self.cfg.tls:
            log.warning("%s: mqtt.tls = false: PLAIN MQTT to %s:%d, NOT encrypted: anyone on the network can read "
                        "the data%s and inject messages; use it only on a trusted plant network", self.name,
                        self.cfg.host, self.cfg.port, " and the password" if self.cfg.password else "")
        elif self.cfg.tls_insecure:
            log.warning("mqtt.tls_insecure = true: the broker's host name is NOT verified; lab use only")
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except LinkError as exc:
                self._failed(str(exc))
            except (OSError, ssl.SSLError) as exc:
                self._failed(explain(exc, self.cfg))
            await asyncio.sleep(backoff(attempt, self.cfg.retry_min, self.cfg.retry_max, self._rng))
            attempt += 1

    async def _session(self) -> None:
        assert self._loop is not None
        check_client_certificate(self.cfg)
        will = self.will_payload if isinstance(self.will_payload, bytes) else await self.will_payload()
        client = self._new_client(will)
        self._client = client
        self._disconnected.clear()
        misc: asyncio.Task[None] | None = None
        try:
            properties = None
            if self.cfg.version == "5":
                properties = Properties(paho.PacketTypes.CONNECT)
                properties.SessionExpiryInterval = 0
                if self.max_packet is not None:
                    properties.MaximumPacketSize = self.max_packet
            await self._loop.run_in_executor(None, lambda: client.connect(
                self.cfg.host, self.cfg.port, keepalive=max(1, round(self.cfg.keepalive)),
                properties=properties))
            misc = asyncio.create_task(self._misc(client), name="mqtt-misc")
            await self._disconnected.wait()
        finally:
            self.connected.clear()
            if misc is not None:
                misc.cancel()
            self._client = None
            sock = client.socket()
            if sock is not None:
                self._drop_socket(sock)
            client.disconnect()
            client.loop_misc()  # lets paho close the socket and run its callbacks
            if self.last_error == "" and self.connects:
                self.last_error = "disconnected"

    async def _misc(self, client: paho.Client) -> None:
        """paho's timers: keepalive pings, and noticing a dead connection."""
        while True:
            await asyncio.sleep(1.0)
            if client.loop_misc() != paho.MQTT_ERR_SUCCESS:
                self._disconnected.set()
                return

    async def close(self, timeout: float = 3.0) -> None:
        """Leave so that the broker publishes our Will (the retained "offline" state).

        MQTT 5 has a disconnect reason for exactly this (0x04, "disconnect with Will message");
        on 3.1.1 the socket is closed without DISCONNECT, which brokers treat the same way.
        Either way nothing is published except through the outbox.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            return
        if self.cfg.version == "5":
            client.disconnect(reasoncode=ReasonCode(paho.PacketTypes.DISCONNECT, identifier=0x04))
        else:
            sock = client.socket()
            if sock is not None:
                self._drop_socket(sock)
                sock.close()
            self._disconnected.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                await self._disconnected.wait()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                correlation: bytes | None = None) -> int:
        """Hand one message to paho; returns its mid (PUBACK arrives through ``on_ack``).

        ``correlation`` goes out as the MQTT 5 Correlation Data (dropped on MQTT 3.1.1, which has none).
        """
        client = self._client
        if client is None or not self.connected.is_set():
            raise LinkError("not connected")
        properties = None
        if correlation is not None and self.cfg.version == "5":
            properties = Properties(paho.PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish refused by the client: {paho.error_string(info.rc)}")
        return int(info.mid)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            self._failed(f"broker {self.cfg.host}:{self.cfg.port} refused the connection: {reason}"
                         + (" (check mqtt.username/password or the client certificate's identity)"
                            if reason.value in (0x86, 0x87, 4, 5) else ""))
            self._disconnected.set()
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connects += 1
        now = time.time()
        if self._down_since is not None:
            log.info("%s: connected to %s:%d again after %.1f s", self.name, self.cfg.host, self.cfg.port,
                     now - self._down_since)
        else:
            log.info("%s: connected to %s:%d (MQTT %s, %s)", self.name, self.cfg.host, self.cfg.port,
                     self.cfg.version, "TLS" if self.cfg.tls else "plain TCP, not encrypted")
        self._down_since = None
        self.last_error = ""
        self.connected.set()
        self.on_up()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if self.connected.is_set():
            self._failed(f"broker {self.cfg.host}:{self.cfg.port}: connection lost ({reason})")
        self.connected.clear()
        self._disconnected.set()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            # The broker did not take it (e.g. not authorised for the topic): it stays in the outbox
            # and goes out again after the next reconnect, unless its owner drops it (a command
            # response to a topic we may not publish to would otherwise come back for ever).
            log.warning("mqtt: broker refused message %d: %s", mid, reason)
            if not self.on_refused(mid):
                self._disconnected.set()
            return
        self.on_ack(mid)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(message)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._add_reader, client, sock)

    def _add_reader(self, client: paho.Client, sock: Any) -> None:
        assert self._loop is not None
        if sock.fileno() < 0:
            return
        self._loop.add_reader(sock, self._readable, client)
        if client.want_write():
            self._loop.add_writer(sock, self._writable, client)

    def _readable(self, client: paho.Client) -> None:
        if client.loop_read() != paho.MQTT_ERR_SUCCESS:
            self._disconnected.set()

    def _writable(self, client: paho.Client) -> None:
        if client.loop_write() != paho.MQTT_ERR_SUCCESS:
            self._disconnected.set()

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._drop_socket(sock)
        self._disconnected.set()
        self.connected.clear()

    def _drop_socket(self, sock: Any) -> None:
        # fileno() is -1 once closed: close() on MQTT 3.1.1 drops and closes the socket itself, and
        # _session's cleanup then gets the same, closed socket from paho (remove_reader would raise).
        if self._loop is not None and not self._loop.is_closed() and sock.fileno() >= 0:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    # paho calls these from the executor thread during connect(), so they hop to the loop.
    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._watch_write, client, sock, True)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._watch_write, client, sock, False)

    def _watch_write(self, client: paho.Client, sock: Any, on: bool) -> None:
        assert self._loop is not None
        if sock.fileno() < 0:
            return
        if on:
            self._loop.add_writer(sock, self._writable, client)
        else:
            self._loop.remove_writer(sock)

    def _failed(self, message: str) -> None:
        self.last_error = message
        if self._down_since is None:
            self._down_since = time.time()
            log.warning("%s: %s; buffering in the outbox and retrying with backoff up to %g s", self.name, message,
                        self.cfg.retry_max)
        else:
            log.debug("%s: still down: %s", self.name, message)
