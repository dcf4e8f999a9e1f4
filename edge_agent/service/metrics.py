"""A Prometheus text-format endpoint (``GET /metrics``), off by default, on loopback by default.

Hand-written exposition format rather than prometheus-client: a dozen gauges and counters do
not justify a dependency. Served by asyncio on the agent's own loop; any other path is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(agent: Agent) -> str:
    """The current metrics in Prometheus text exposition format 0.0.4."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP edge_agent_{name} {help_text}")
        lines.append(f"# TYPE edge_agent_{name} {kind}")
        lines.extend(f"edge_agent_{name}{labels} {value:.9g}" for labels, value in samples)

    devices = list(agent.runners.values())
    metric("points_read_total", "counter", "Readings received from devices and models.", [("", agent.received)])
    metric("history_rows_total", "counter", "Samples stored in the twin's history.", [("", agent.stored)])
    metric("device_up", "gauge", "1 while the device's link is up.",
           [(f'{{device="{_label(r.device.name)}"}}', float(r.status.state == "up")) for r in devices])
    metric("device_read_errors_total", "counter", "Failed connects and reads per device.",
           [(f'{{device="{_label(r.device.name)}"}}', r.status.read_errors) for r in devices])
    average = agent.flush_seconds / agent.flushes if agent.flushes else 0.0
    metric("twin_write_seconds", "gauge", "Duration of the last twin flush.", [("", agent.last_flush_seconds)])
    metric("twin_write_seconds_average", "gauge", "Average twin flush duration since start.", [("", average)])
    metric("twin_pending_readings", "gauge", "Readings waiting for the next flush.", [("", agent.pending_count)])
    if agent.sync is not None and agent.outbox is not None:
        stats = agent.outbox.stats()
        metric("mqtt_connected", "gauge", "1 while connected to the broker.",
               [("", float(agent.sync.link.connected.is_set()))])
        metric("outbox_depth", "gauge", "Messages in the outbox not yet acknowledged.", [("", stats.depth)])
        metric("outbox_bytes", "gauge", "Payload bytes in the outbox.", [("", stats.bytes)])
        metric("outbox_oldest_age_seconds", "gauge", "Age of the oldest outbox message.",
               [("", stats.oldest_age_s or 0.0)])
        metric("mqtt_published_total", "counter", "Messages handed to the broker.", [("", agent.sync.published)])
        metric("mqtt_acked_total", "counter", "Messages the broker acknowledged.", [("", agent.sync.acked)])
        metric("outbox_dropped_messages_total", "counter", "Telemetry messages dropped when the outbox was full.",
               [("", stats.dropped_messages)])
        metric("outbox_dropped_samples_total", "counter", "Samples in dropped telemetry messages.",
               [("", stats.dropped_samples)])
    models = list(agent.models.items())
    if models:
        metric("model_evaluation_cpu_seconds", "gauge", "CPU of the last evaluation, inputs gathered included.",
               [(f'{{model="{_label(n)}"}}', m.status.cpu_us / 1e6) for n, m in models])
        metric("model_evaluations_total", "counter", "Evaluations per model.",
               [(f'{{model="{_label(n)}"}}', m.status.evaluations) for n, m in models])
        metric("model_skips_total", "counter", "Evaluations skipped by the data-quality gate.",
               [(f'{{model="{_label(n)}"}}', sum(m.status.skips.values())) for n, m in models])
        metric("model_anomaly_active", "gauge", "1 while the model's anomaly is raised.",
               [(f'{{model="{_label(n)}"}}', float(m.anomaly_active)) for n, m in models])
    return "\n".join(lines) + "\n"


async def serve(agent: Agent, host: str, port: int) -> None:
    """Serve ``/metrics`` until cancelled."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: not needed
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status = render(agent).encode(), "200 OK"
            else:
                body, status = b"only GET /metrics is served here\n", "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
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
