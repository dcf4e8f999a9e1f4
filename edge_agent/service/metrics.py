"""A Prometheus text-format endpoint (``GET /metrics``), off by default, on loopback by default.

Hand-written exposition format rather than prometheus-client: a dozen gauges and counters do
not justify a dependency. Served by asyncio on the agent's own loop; any other path is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from edge_agent.service.status import GatewayStatus

log = logging.getLogger(__name__)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(status: GatewayStatus) -> str:
    """The current metrics in Prometheus text exposition format 0.0.4."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP edge_agent_{name} {help_text}")
        lines.append(f"# TYPE edge_agent_{name} {kind}")
        lines.extend(f"edge_agent_{name}{labels} {value:.9g}" for labels, value in samples)

    devices, twin = status.devices, status.twin
    metric("points_read_total", "counter", "Readings received from devices and models.", [("", twin.received)])
    metric("history_rows_total", "counter", "Samples stored in the twin's history.", [("", twin.stored)])
    metric("device_up", "gauge", "1 while the device's link is up.",
           [(f'{{device="{_label(d.name)}"}}', float(d.state == "up")) for d in devices])
    metric("device_read_errors_total", "counter", "Failed connects and reads per device.",
           [(f'{{device="{_label(d.name)}"}}', d.read_errors) for d in devices])
    average = twin.flush_seconds / twin.flushes if twin.flushes else 0.0
    metric("twin_write_seconds", "gauge", "Duration of the last twin flush.", [("", twin.last_flush_seconds)])
    metric("twin_write_seconds_average", "gauge", "Average twin flush duration since start.", [("", average)])
    metric("twin_pending_readings", "gauge", "Readings waiting for the next flush.", [("", twin.pending)])
    link = status.mqtt
    if link is not None and link.outbox is not None:
        stats = link.outbox
        metric("mqtt_connected", "gauge", "1 while connected to the broker.", [("", float(link.connected))])
        metric("outbox_depth", "gauge", "Messages in the outbox not yet acknowledged.", [("", stats.depth)])
        metric("outbox_bytes", "gauge", "Payload bytes in the outbox.", [("", stats.bytes)])
        metric("outbox_oldest_age_seconds", "gauge", "Age of the oldest outbox message.",
               [("", stats.oldest_age_s or 0.0)])
        metric("mqtt_published_total", "counter", "Messages handed to the broker.", [("", link.published)])
        metric("mqtt_acked_total", "counter", "Messages the broker acknowledged.", [("", link.acked)])
        metric("outbox_dropped_messages_total", "counter", "Telemetry messages dropped when the outbox was full.",
               [("", stats.dropped_messages)])
        metric("outbox_dropped_samples_total", "counter", "Samples in dropped telemetry messages.",
               [("", stats.dropped_samples)])
    models = status.models
    if models:
        metric("model_evaluation_cpu_seconds", "gauge", "CPU of the last evaluation, inputs gathered included.",
               [(f'{{model="{_label(m.name)}"}}', m.cpu_us / 1e6) for m in models])
        metric("model_evaluations_total", "counter", "Evaluations per model.",
               [(f'{{model="{_label(m.name)}"}}', m.evaluations) for m in models])
        metric("model_skips_total", "counter", "Evaluations skipped by the data-quality gate.",
               [(f'{{model="{_label(m.name)}"}}', m.skips) for m in models])
        metric("model_anomaly_active", "gauge", "1 while the model's anomaly is raised.",
               [(f'{{model="{_label(m.name)}"}}', float(m.anomaly)) for m in models])
    return "\n".join(lines) + "\n"


async def serve(status: Callable[[], GatewayStatus], host: str, port: int) -> None:
    """Serve ``/metrics`` until cancelled."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: not needed
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, code = render(status()).encode(), "200 OK"
            else:
                body, code = b"only GET /metrics is served here\n", "404 Not Found"
            writer.write(f"HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as exc:
            log.debug("metrics: bad request: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics: serving http://%s:%d/metrics", host, port)
    async with server:
        await server.serve_forever()
