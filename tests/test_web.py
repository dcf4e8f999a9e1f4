"""The local web page, served by the real agent and looked at in headless Chromium: the DOM after the page's
own script ran, and a screenshot of each page; read-only (405), escaped, nothing from outside the gateway."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.errors import TwinError
from edge_agent.store.views import TwinView
from tests import browser, builders
from tests.fakes import FakePlant
from tests.helpers import free_port, wait_for
from tests.onnx_models import zscore_model

ODD_DEVICE = 'pump&<1>'
ODD_POINT = 'pump.flow"<script>alert(1)</script>'
ODD_UNIT = "m3/h <b>bold</b>"
EVIL_MESSAGE = "<img src=x onerror=alert(2)> & more"


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Agent, FakePlant, str]]:
    """The agent with the web page on a free port, a chiller (with an anomaly model that fires at once), a pump
    with hostile names, one write and one event with markup in its message."""
    port = free_port()
    model = zscore_model(tmp_path / "temp.onnx", [0.0], [1.0], inputs=["chiller1.temp"], threshold=1.0)
    doc = builders.config(tmp_path / "data", id="gw-web", site="north", web={"enabled": True, "port": port},
                          gate={"block_on_anomaly": False},
                          twin={"flush_interval": "50ms", "points_interval": "0s"}, devices=[
        builders.modbus("chiller1", [
            builders.point("chiller1.temp", address=0, unit="degC"),
            builders.point("chiller1.setpoint", address=1, unit="degC", writable=True, min=0.0, max=100.0)],
            interval="100ms"),
        builders.modbus(ODD_DEVICE, [builders.point(ODD_POINT, address=0, unit=ODD_UNIT)], interval="100ms")],
        models=[builders.model("temp-health", "anomaly", model, interval="100ms", raise_after=1)])
    cfg = builders.load(doc, tmp_path / "agent.toml")
    seed_history(cfg.twin_path, "chiller1.temp", minutes=50)
    plant = FakePlant(default=50.0)
    agent = Agent(cfg, driver_factory=plant.driver)
    await agent.start()
    try:
        await wait_for(lambda: agent.models["temp-health"].anomaly_active, what="the anomaly raised")
        result = await agent.request_write("chiller1.setpoint", 7.5, source="operator", actor="alice")
        assert result.ok, result
        agent.record_event({"ts": time.time(), "source": "test", "kind": "note", "state": "raised",
                            "message": EVIL_MESSAGE})
        for value in range(40, 50):  # a short history to draw
            plant.device("chiller1").values["chiller1.temp"] = float(value)
            await wait_for(lambda v=value: (r := agent.latest.get("chiller1.temp")) is not None and r.value == v)
        await wait_for(lambda: _page_up(port), what="the web page")
        yield agent, plant, f"http://127.0.0.1:{port}"
    finally:
        await agent.stop()


def seed_history(path: Path, point: str, *, minutes: int) -> None:
    """One sample a minute over the last ``minutes``, a slow wave between 40 and 60 (before the agent starts)."""
    from edge_agent.store.twin import Twin

    path.parent.mkdir(parents=True, exist_ok=True)
    twin = Twin.open(path)
    now = time.time()
    with twin.conn:
        twin.conn.executemany("INSERT INTO history (point, value, quality, ts) VALUES (?, ?, 'good', ?)",
                              [(point, 50.0 + 10.0 * math.sin(i / 5), now - 60.0 * (minutes - i))
                               for i in range(minutes)])
    twin.close()


async def _page_up(port: int) -> bool:
    status, _, _ = await request(port, "HEAD", "/")
    return status == 200


async def request(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request; (status, headers, body)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, {}, b""
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, content


def rows(dom: str) -> dict[str, list[str]]:
    """The points table: data-point -> the texts of its cells."""
    found = {}
    for point, cells in re.findall(r'<tr data-point="([^"]*)">(.*?)</tr>', dom, re.S):
        found[point] = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", cells, re.S)]
    return found


async def test_overview_in_chromium_shows_every_point_device_anomaly_write_and_event(tmp_path: Path) -> None:
    async with served(tmp_path) as (agent, plant, url):
        dom = await browser.dom(url + "/", virtual_time_ms=7000)
        shot = tmp_path / "overview.png"
        width, height = await browser.screenshot(url + "/", shot)
        plant.device("chiller1").reachable = False  # the page shows health as it changes
        await wait_for(lambda: agent.runners["chiller1"].status.state == "down", what="chiller1 down")
        later = await browser.dom(url + "/")
    table = rows(dom)
    assert table["chiller1.temp"][1:4] == ["49", "degC", "good"], table["chiller1.temp"]
    assert re.fullmatch(r"\d+\.\d s", table["chiller1.temp"][4]), table["chiller1.temp"]
    assert table["chiller1.setpoint"][1:4] == ["7.5", "degC", "good"]
    assert table["temp-health.score"][0] == "temp-health.score"
    assert re.search(r'<section class="device" data-device="chiller1"><h2>chiller1 <span class="health up">up</span>',
                     dom), dom[:2000]
    # hostile names and texts are shown as text, never as markup
    odd = table['pump.flow&quot;&lt;script&gt;alert(1)&lt;/script&gt;']
    assert odd[0] == 'pump.flow"&lt;script&gt;alert(1)&lt;/script&gt;' and odd[2] == "m3/h &lt;b&gt;bold&lt;/b&gt;"
    assert 'data-device="pump&amp;&lt;1&gt;"' in dom and "<b>bold</b>" not in dom
    assert re.findall(r"<script[^>]*>", dom) == ['<script src="/static/web.js" defer="">']
    assert "&lt;img src=x onerror=alert(2)&gt; &amp; more" in dom and "<img" not in dom
    assert re.search(r'<section class="anomalies active">.*temp-health', dom, re.S)
    writes = dom[dom.index('<section class="writes">'):dom.index('<section class="events">')]
    assert all(text in writes for text in ("operator", "alice", "chiller1.setpoint", "7.5", "applied"))
    assert 'data-refreshed="1"' in dom  # the page's script fetched it again by itself
    assert (width, height) == (1280, 1400) and shot.stat().st_size > 20_000
    assert re.search(r'data-device="chiller1"><h2>chiller1 <span class="health down">down</span>', later)


async def test_trend_page_draws_the_history_with_a_range_selector(tmp_path: Path) -> None:
    async with served(tmp_path) as (_, _, url):
        dom = await browser.dom(url + "/points/chiller1.temp")
        short = await browser.dom(url + "/points/chiller1.temp?range=10m")
        shot = tmp_path / "trend.png"
        size = await browser.screenshot(url + "/points/chiller1.temp?range=10m", shot, height=900)
    assert "<h1>chiller1.temp</h1>" in dom
    line = re.search(r'<polyline class="line" fill="none" points="([^"]+)"', dom)
    assert line is not None
    points = [tuple(map(float, p.split(","))) for p in line.group(1).split()]
    assert len(points) >= 2 and [x for x, _ in points] == sorted(x for x, _ in points)
    assert len(re.findall(r'<text class="ylabel"', dom)) == 5 and len(re.findall(r'<text class="xlabel"', dom)) == 5
    ranges = re.findall(r'<a href="/points/chiller1.temp\?range=(\w+)"( class="range active" aria-current="page")?',
                        dom)
    assert [r for r, _ in ranges] == ["10m", "1h", "6h", "24h", "7d"]
    assert [r for r, active in ranges if active] == ["1h"]
    assert re.search(r'aria-current="page">10 min</a>', short)
    summary = re.search(r'<p class="summary">(\d+) samples · min (\S+) · max (\S+)', short)
    assert summary is not None and float(summary.group(2)) <= 41 and float(summary.group(3)) >= 50.0, summary
    assert len(points) >= 40  # the seeded hour, one sample a minute, each in a bucket of its own
    assert size == (1280, 900) and shot.stat().st_size > 10_000


async def test_read_only_escaped_and_self_contained(tmp_path: Path) -> None:
    async with served(tmp_path) as (agent, plant, url):
        port = int(url.rsplit(":", 1)[1])
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            status, headers, _ = await request(port, method, "/points/chiller1.setpoint", b"value=99")
            assert (status, headers.get("Allow")) == (405, "GET, HEAD"), method
        status, headers, body = await request(port, "HEAD", "/")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert (await request(port, "GET", "/points/no.such.point"))[0] == 404
        assert (await request(port, "GET", "/static/../agent.toml"))[0] == 404
        css = await request(port, "GET", "/static/web.css")
        assert css[0] == 200 and css[1]["Content-Type"].startswith("text/css") and b".q-good" in css[2]
        pages = [(await request(port, "GET", path))[2].decode() for path in
                 ("/", "/points/chiller1.temp", "/points/" + ODD_POINT.replace('"', "%22").replace("<", "%3C")
                  .replace(">", "%3E").replace("/", "%2F"))]
        assert "<h1>" + 'pump.flow&quot;&lt;script&gt;' in pages[2]
        for page in pages:  # every resource is the agent's own
            targets = re.findall(r'(?:src|href)="([^"]*)"', page)
            assert targets and all(t.startswith(("/", "?", "data:")) for t in targets), targets
        assert plant.device("chiller1").written == [("chiller1.setpoint", 7.5)]  # only the test's own write
        assert agent.stored > 0


def test_a_trend_query_past_its_time_budget_is_interrupted(tmp_path: Path) -> None:
    from edge_agent.store.twin import Twin

    cfg = builders.load(builders.config(tmp_path / "data", devices=[builders.modbus("d", [builders.point(
        "d.x", address=0)])]), tmp_path / "agent.toml")
    twin = Twin.open(cfg.twin_path)
    twin.conn.executemany("INSERT INTO history (point, value, quality, ts) VALUES ('d.x', ?, 'good', ?)",
                          [(float(i), 1000.0 + i) for i in range(50_000)])
    twin.conn.commit()
    twin.close()
    with TwinView.open(cfg.twin_path) as view:
        full = view.trend("d.x", 1000.0, 51_000.0, 100)
        assert len(full) == 100 and sum(b["n"] for b in full) == 50_000
        try:
            view.trend("d.x", 1000.0, 51_000.0, 100, budget=0.0)
        except TwinError as exc:
            assert "takes more than 0 s to read; choose a shorter range" in str(exc)
        else:
            raise AssertionError("the query was not interrupted")
        assert view.trend("d.x", 1000.0, 1010.0, 100)[0]["n"] == 1  # the connection still works afterwards
