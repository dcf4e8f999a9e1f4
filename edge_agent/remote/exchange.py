"""The MQTT side of ``edge-agent command``: one request/response exchange with a gateway."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Exchange:
    """One MQTT 5 request/response over TLS with paho's own network thread (a short-lived CLI)."""

    def __init__(self, host: str, port: int, *, ca: str, cert: str, key: str) -> None:
        self.host, self.port = host, port
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-operator-{uuid.uuid4().hex[:12]}",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set_context(context)
        self._done = threading.Condition()
        self._subscribed = False
        self._answer: dict[str, Any] | None = None
        self._error = ""
        self._correlation = b""

    def request(self, topic: str, reply_to: str, envelope: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        self._correlation = envelope["id"].encode()
        client = self.client
        client.on_connect = lambda c, _u, _f, reason, _p: (
            self._fail(f"broker refused the connection: {reason}") if reason.is_failure
            else c.subscribe(reply_to, qos=1))
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        deadline = time.monotonic() + timeout
        client.connect(self.host, self.port, keepalive=30)
        client.loop_start()
        try:
            self._wait(lambda: self._subscribed, deadline, "the subscription")
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = reply_to
            properties.CorrelationData = self._correlation
            client.publish(topic, json.dumps(envelope, ensure_ascii=False).encode(), qos=1, properties=properties)
            self._wait(lambda: self._answer is not None, deadline, f"the answer to command {envelope['id']}")
            assert self._answer is not None
            return self._answer
        finally:
            client.disconnect()
            client.loop_stop()

    def _wait(self, condition: Any, deadline: float, what: str) -> None:
        with self._done:
            self._done.wait_for(lambda: condition() or self._error, max(0.0, deadline - time.monotonic()))
            if self._error:
                raise OSError(self._error)
            if not condition():
                raise TimeoutError(f"no {what} from {self.host}:{self.port} in time")

    def _fail(self, text: str) -> None:
        with self._done:
            self._error = text
            self._done.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._fail(f"broker refused the subscription: {reasons}")
            return
        with self._done:
            self._subscribed = True
            self._done.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        if correlation is not None and bytes(correlation) != self._correlation:
            return
        try:
            answer = json.loads(message.payload)
        except ValueError:
            return
        with self._done:
            self._answer = answer if isinstance(answer, dict) else {"ok": False, "answer": answer}
            self._done.notify_all()
