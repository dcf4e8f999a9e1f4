"""The local web page: the plant at a glance in a browser, read-only, served by the agent itself.

``[web] enabled = true`` serves, on ``host:port`` (loopback by default):

- ``/``: every point with its value, unit, quality and age, grouped by device with the device's
  health; active anomalies; the recent writes and events. It refreshes itself every few seconds
  (a small script fetches the page again and swaps the content; without scripts the page still
  shows everything, a reload away).
- ``/points/<name>``: a trend chart (SVG, drawn here) of the point's history, with a range
  selector (10 min to 7 days).
- ``/static/...``: the page's stylesheet and script, package data of :mod:`edge_agent.service`.

Read-only by construction: only GET and HEAD are served (anything else is a 405), and nothing on
the page sends a request that changes anything. Everything comes from the agent (plant networks are
offline); the Content-Security-Policy header forbids anything else. Every operator- or
config-controlled text (point names, units, event messages) is HTML-escaped.

Current values come from memory (the agent's snapshot and latest readings). History, writes and
events are read through the agent's read-only twin view off the event loop, each query bounded
(rows, range, and a time budget for the trend query). Like the metrics endpoint, the HTTP is
written by hand on asyncio: a few GET routes do not justify a framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

from edge_agent.config import AgentConfig
from edge_agent.errors import TwinError
from edge_agent.service import webpages
from edge_agent.service.status import GatewayStatus
from edge_agent.store.views import TwinView

log = logging.getLogger(__name__)

Query = Callable[[Callable[[TwinView], Any]], Awaitable[Any]]
RANGES = {"10m": 600.0, "1h": 3600.0, "6h": 6 * 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
DEFAULT_RANGE = "1h"
BUCKETS = 400  # most points a trend chart draws, whatever the range
RECENT = 20  # rows of writes and events on the overview
MAX_LINE = 8192  # longest request or header line accepted
MAX_HEADERS = 100
MAX_CLIENTS = 16  # requests served at once; more wait
STATIC = {"web.css": "text/css; charset=utf-8", "web.js": "text/javascript; charset=utf-8"}
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nCache-Control: no-store\r\n"
)


@dataclass(frozen=True, slots=True)
class Response:
    status: str
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    extra: str = ""  # more header lines, each ending in CRLF


class WebPage:
    """Renders the pages from the agent's narrow faces; :meth:`serve` runs the HTTP server."""

    def __init__(self, status: Callable[[], GatewayStatus], config: Callable[[], AgentConfig],
                 current: Callable[[], list[dict[str, Any]]], query: Query) -> None:
        self.status = status
        self.config = config
        self.current = current
        self.query = query
        self._static: dict[str, bytes] = {}
        self._clients = asyncio.Semaphore(MAX_CLIENTS)
        self.requests = 0

    async def serve(self, host: str, port: int) -> None:
        """Serve until cancelled."""
        self._static = await asyncio.to_thread(_load_static)
        try:
            server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE)
        except OSError as exc:  # the task dies with it: status and `edge-agent status` show the dead part
            log.error("web: cannot serve the local page on %s:%d: %s (check web.host and web.port)", host, port, exc)
            raise
        log.info("web: serving the local page at http://%s:%d/", host, port)
        async with server:
            await server.serve_forever()

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._clients:
                async with asyncio.timeout(10.0):
                    method, target = await _read_request(reader)
                    self.requests += 1
                    response = await self._respond(method, target)
                    head = (f"HTTP/1.1 {response.status}\r\nContent-Type: {response.content_type}\r\n"
                            f"Content-Length: {len(response.body)}\r\n{SECURITY_HEADERS}{response.extra}"
                            "Connection: close\r\n\r\n").encode()
                    writer.write(head if method == "HEAD" else head + response.body)
                    await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, UnicodeDecodeError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log.debug("web: bad or broken request: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _respond(self, method: str, target: str) -> Response:
        if method not in ("GET", "HEAD"):
            return Response("405 Method Not Allowed", b"this page is read-only: only GET and HEAD\n",
                            "text/plain; charset=utf-8", "Allow: GET, HEAD\r\n")
        path, _, query = target.partition("?")
        try:
            return await self._route(unquote(path, errors="strict"), parse_qs(query))
        except UnicodeDecodeError:
            return _not_found()
        except Exception:  # a bug must not take the page down; the next request gets a fresh try
            log.exception("web: error rendering %s", path)
            return Response("500 Internal Server Error", b"internal error (logged by the agent)\n",
                            "text/plain; charset=utf-8")

    async def _route(self, path: str, params: dict[str, list[str]]) -> Response:
        if path == "/":
            return Response("200 OK", (await self.overview()).encode())
        if path.startswith("/points/"):
            name = path[len("/points/"):]
            span = params.get("range", [DEFAULT_RANGE])[0]
            page = await self.trend(name, span if span in RANGES else DEFAULT_RANGE)
            return Response("200 OK", page.encode()) if page is not None else _not_found()
        if path.startswith("/static/") and path[len("/static/"):] in self._static:
            name = path[len("/static/"):]
            return Response("200 OK", self._static[name], STATIC[name])
        return _not_found()

    # ------------------------------------------------------------------ pages

    async def overview(self) -> str:
        """The ``/`` page."""
        status, config, rows = self.status(), self.config(), self.current()
        writes, events, problem = await self._recent()
        return webpages.overview(status, config, {r["name"]: r for r in rows}, writes, events, problem, time.time())

    async def _recent(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        try:
            writes, events = await self.query(lambda view: (view.writes(0.0, limit=RECENT),
                                                            view.events(0.0, limit=RECENT)))
        except TwinError as exc:
            return [], [], str(exc)
        return list(reversed(writes)), list(reversed(events)), ""

    async def trend(self, name: str, span: str) -> str | None:
        """The ``/points/<name>`` page, or None when there is no such point."""
        config = self.config()
        owner = next(((o, unit) for point, o, unit in config.all_points() if point == name), None)
        if owner is None:
            return None
        now = time.time()
        since = now - RANGES[span]
        try:
            buckets = await self.query(lambda view: view.trend(name, since, now, BUCKETS))
            problem = ""
        except TwinError as exc:
            buckets, problem = [], str(exc)
        row = next((r for r in self.current() if r["name"] == name), None)
        return webpages.trend(self.status(), name, owner[0], owner[1], row, span, list(RANGES), buckets, since, now,
                              problem)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and target of one HTTP/1.x request; its headers are read and ignored (bounded)."""
    line = await reader.readuntil(b"\n")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line: {line[:80]!r}")
    for _ in range(MAX_HEADERS):
        if not (await reader.readuntil(b"\n")).strip():
            return parts[0], parts[1]
    raise ValueError("too many header lines")


def _not_found() -> Response:
    return Response("404 Not Found", webpages.not_found().encode())


def _load_static() -> dict[str, bytes]:
    folder = resources.files("edge_agent.service").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC}
