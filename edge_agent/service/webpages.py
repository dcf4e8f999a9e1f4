"""The local web page's HTML and SVG (see :mod:`edge_agent.service.web`): plain functions of plain data.

Every text that comes from the config, a device or an operator goes through :func:`esc`; URLs are
built with :func:`point_url`. Styling is in ``static/web.css`` (classes only: the page's CSP allows
no inline style), the self-refresh in ``static/web.js``.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from edge_agent.config import AgentConfig
from edge_agent.service.status import GatewayStatus

REFRESH_S = 5  # the page fetches itself again this often
RANGE_LABELS = {"10m": "10 min", "1h": "1 hour", "6h": "6 hours", "24h": "24 hours", "7d": "7 days"}
CHART_W, CHART_H = 800, 320
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 16, 36


def esc(value: Any) -> str:
    """Text for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def point_url(name: str, span: str | None = None) -> str:
    url = "/points/" + quote(name, safe="")
    return url + (f"?range={quote(span)}" if span else "")


def fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def fmt_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _page(title: str, status: GatewayStatus, body: str, now: float) -> str:
    link = status.mqtt
    mqtt = "MQTT off" if link is None else ("MQTT connected" if link.connected else "MQTT offline")
    spb = "" if status.sparkplug is None else (
        f' <span class="badge">Sparkplug {"connected" if status.sparkplug.connected else "offline"}</span>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/web.css">
<script src="/static/web.js" defer></script>
<noscript><meta http-equiv="refresh" content="{REFRESH_S * 6}"></noscript>
</head>
<body>
<header>
<a class="home" href="/">edge-agent</a>
<span class="gateway">gateway <b>{esc(status.gateway)}</b> · site <b>{esc(status.site)}</b></span>
<span class="badge">up {esc(fmt_age(now - status.started))}</span>
<span class="badge">{esc(mqtt)}</span>{spb}
<span class="updated">updated <time id="updated">{esc(fmt_time(now))}</time></span>
</header>
<main id="content" data-refresh="{REFRESH_S}">
{body}
</main>
</body>
</html>
"""


def overview(status: GatewayStatus, config: AgentConfig, rows: Mapping[str, Mapping[str, Any]],
             writes: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]], problem: str,
             now: float) -> str:
    """``/``: devices and their points, active anomalies, recent writes and events."""
    parts = [_anomalies(status)]
    for device in config.devices:
        state = status.device(device.name)
        parts.append(_device(device.name, device.protocol, state, [p.name for p in device.points], rows, now))
    scores = [m.score_point for m in config.models if m.kind == "anomaly"]
    if scores:
        parts.append(_group("models", "model scores", "", scores, rows, now))
    if problem:
        parts.append(f'<p class="problem">history not available: {esc(problem)}</p>')
    parts.append(_writes(writes))
    parts.append(_events(events))
    return _page(f"{status.gateway} · edge-agent", status, "\n".join(parts), now)


def _anomalies(status: GatewayStatus) -> str:
    active = [m for m in status.models if m.anomaly]
    if not active:
        return '<section class="anomalies none"><h2>Active anomalies</h2><p>none</p></section>'
    items = "".join(f'<li data-model="{esc(m.name)}"><b>{esc(m.name)}</b> score {esc(fmt_value(m.last_score))} '
                    f'at {esc(fmt_time(m.last_ts))}</li>' for m in active)
    return f'<section class="anomalies active"><h2>Active anomalies</h2><ul>{items}</ul></section>'


def _device(name: str, protocol: str, state: Any, points: list[str], rows: Mapping[str, Mapping[str, Any]],
            now: float) -> str:
    health = state.state if state is not None else "unknown"
    detail = f"{protocol}"
    if state is not None:
        detail += f" · {health} since {fmt_time(state.since)}"
        if state.last_ok:
            detail += f" · last contact {fmt_age(now - state.last_ok)} ago"
        if state.read_errors:
            detail += f" · {state.read_errors} errors"
        if health != "up" and state.last_error:
            detail += f" · {state.last_error}"
    return _group(name, name, detail, points, rows, now, health=health)


def _group(key: str, title: str, detail: str, points: Iterable[str], rows: Mapping[str, Mapping[str, Any]],
           now: float, *, health: str | None = None) -> str:
    badge = f' <span class="health {esc(health)}">{esc(health)}</span>' if health is not None else ""
    body = "".join(_point_row(name, rows.get(name), now) for name in points)
    return (f'<section class="device" data-device="{esc(key)}"><h2>{esc(title)}{badge}</h2>'
            f'<p class="detail">{esc(detail)}</p>'
            '<table class="points"><thead><tr><th>point</th><th>value</th><th>unit</th><th>quality</th>'
            f'<th>age</th></tr></thead><tbody>{body}</tbody></table></section>')


def _point_row(name: str, row: Mapping[str, Any] | None, now: float) -> str:
    value = row.get("value") if row else None
    quality = str(row.get("quality", "bad")) if row else "bad"
    ts = row.get("ts") if row else None
    unit = row.get("unit", "") if row else ""
    age = fmt_age(now - ts) if isinstance(ts, int | float) else "-"
    return (f'<tr data-point="{esc(name)}"><td class="name"><a href="{esc(point_url(name))}">{esc(name)}</a></td>'
            f'<td class="value">{esc(fmt_value(value))}</td><td class="unit">{esc(unit)}</td>'
            f'<td class="quality q-{esc(quality)}">{esc(quality)}</td><td class="age">{esc(age)}</td></tr>')


def _table(css: str, title: str, headings: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt_value(c))}</td>" for c in row) + "</tr>" for row in rows)
    content = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if body else f"<p>{esc(empty)}</p>"
    return f'<section class="{esc(css)}"><h2>{esc(title)}</h2>{content}</section>'


def _writes(writes: Sequence[Mapping[str, Any]]) -> str:
    return _table("writes", "Recent writes", ("time", "source", "actor", "point", "requested", "written",
                                               "read back", "result", "reason"),
                  ((fmt_time(w.get("ts")), w.get("source"), w.get("actor"), w.get("point"), w.get("requested"),
                    w.get("written"), w.get("readback"), w.get("result"), w.get("reason")) for w in writes),
                  "no writes yet")


def _events(events: Sequence[Mapping[str, Any]]) -> str:
    return _table("events", "Recent events", ("time", "source", "kind", "state", "score", "message"),
                  ((fmt_time(e.get("ts")), e.get("source"), e.get("kind"), e.get("state"), e.get("score"),
                    e.get("message")) for e in events), "no events yet")


# ------------------------------------------------------------------------------------- the trend page


def trend(status: GatewayStatus, name: str, owner: str, unit: str, row: Mapping[str, Any] | None, span: str,
          spans: Sequence[str], buckets: Sequence[Mapping[str, Any]], since: float, until: float,
          problem: str) -> str:
    """``/points/<name>``: the point's current value, a range selector and the trend chart."""
    now = time.time()
    current, other = ' class="range active" aria-current="page"', ' class="range"'
    links = "".join(f'<a href="{esc(point_url(name, s))}"{current if s == span else other}>'
                    f'{esc(RANGE_LABELS.get(s, s))}</a>' for s in spans)
    samples = sum(int(b["n"]) for b in buckets)
    summary = ""
    if buckets:
        low, high = min(b["min"] for b in buckets), max(b["max"] for b in buckets)
        summary = (f'<p class="summary">{samples} samples · min {esc(fmt_value(low))} · max {esc(fmt_value(high))}'
                   f' {esc(unit)}</p>')
    chart = chart_svg(name, unit, buckets, since, until) if buckets else (
        f'<p class="empty">{esc(problem) if problem else "no numeric history in this range"}</p>')
    body = (f'<nav class="back"><a href="/">all points</a></nav>'
            f'<section class="trend" data-point="{esc(name)}"><h1>{esc(name)}</h1>'
            f'<p class="detail">{esc(owner)} · {_point_now(row, unit, now)}</p>'
            f'<nav class="ranges">{links}</nav>{chart}{summary}</section>')
    return _page(f"{name} · edge-agent", status, body, now)


def _point_now(row: Mapping[str, Any] | None, unit: str, now: float) -> str:
    if row is None:
        return "no value yet"
    ts = row.get("ts")
    age = fmt_age(now - ts) if isinstance(ts, int | float) else "-"
    quality = str(row.get("quality", "bad"))
    return (f'now <b class="value">{esc(fmt_value(row.get("value")))}</b> {esc(unit)} · '
            f'<span class="quality q-{esc(quality)}">{esc(quality)}</span> · {esc(age)} old')


def chart_svg(name: str, unit: str, buckets: Sequence[Mapping[str, Any]], since: float, until: float) -> str:
    """An SVG line chart of the buckets' averages over their min..max band, with labelled axes."""
    low = min(float(b["min"]) for b in buckets)
    high = max(float(b["max"]) for b in buckets)
    if high - low < 1e-12:
        low, high = low - 1.0, high + 1.0
    pad = (high - low) * 0.05
    low, high = low - pad, high + pad
    plot_w, plot_h = CHART_W - PAD_L - PAD_R, CHART_H - PAD_T - PAD_B

    def x(ts: float) -> float:
        return PAD_L + plot_w * (ts - since) / max(until - since, 1e-9)

    def y(v: float) -> float:
        return PAD_T + plot_h * (1 - (v - low) / (high - low))

    parts = [f'<svg class="chart" viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" height="{CHART_H}" '
             f'role="img" aria-label="{esc(f"trend of {name}")}" xmlns="http://www.w3.org/2000/svg">']
    decimals = max(0, 2 - math.floor(math.log10(high - low)))  # three figures across the span
    for i in range(5):  # horizontal grid with value labels
        v = low + (high - low) * i / 4
        parts.append(f'<line class="grid" x1="{PAD_L}" x2="{CHART_W - PAD_R}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
                     f'<text class="ylabel" x="{PAD_L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
                     f'{v:.{decimals}f}</text>')
    fmt = "%H:%M" if until - since <= 86400 else "%m-%d %H:%M"
    for i in range(5):  # time axis
        ts = since + (until - since) * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(f'<text class="xlabel" x="{x(ts):.1f}" y="{CHART_H - 10}" text-anchor="{anchor}">'
                     f'{esc(time.strftime(fmt, time.localtime(ts)))}</text>')
    parts.append(f'<text class="unit" x="{PAD_L}" y="{PAD_T - 4}">{esc(unit)}</text>')
    mids = [(x((float(b["first_ts"]) + float(b["last_ts"])) / 2), b) for b in buckets]
    band = [f"{px:.1f},{y(float(b['max'])):.1f}" for px, b in mids]
    band += [f"{px:.1f},{y(float(b['min'])):.1f}" for px, b in reversed(mids)]
    parts.append(f'<polygon class="band" points="{" ".join(band)}"/>')
    line = " ".join(f"{px:.1f},{y(float(b['avg'])):.1f}" for px, b in mids)
    parts.append(f'<polyline class="line" fill="none" points="{line}"/>')
    parts.append(f'<rect class="frame" x="{PAD_L}" y="{PAD_T}" width="{plot_w}" height="{plot_h}" fill="none"/>')
    parts.append("</svg>")
    return "".join(parts)


def not_found() -> str:
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>not found · edge-agent</title>'
            '<link rel="stylesheet" href="/static/web.css"></head><body><main><h1>Not found</h1>'
            '<p><a href="/">all points</a></p></main></body></html>')
