"""What each remote command does (see :mod:`edge_agent.remote.dispatch` for the checks and codes).

viewer: ping, status, read, history, events, audit; operator: write, set_mode, ack; admin (in
:mod:`edge_agent.remote.admin`): get_config, set_config, reload, update_model, restart_driver.
Nothing here runs a shell, reads an arbitrary file or executes code. Handlers see the gateway
only through :class:`edge_agent.remote.gateway.Gateway`.
"""

from __future__ import annotations

import time
from typing import Any

from edge_agent import __version__
from edge_agent.config import OPTIMIZER_MODES
from edge_agent.errors import CommandError
from edge_agent.remote import admin
from edge_agent.remote.call import Call, Spec, limit_arg, since_arg
from edge_agent.remote.envelope import finite
from edge_agent.store.views import TwinView

# --------------------------------------------------------------------------- viewer


async def ping(call: Call) -> Any:
    return {"pong": True, "ts": time.time(), "gateway": call.gateway.config.agent.id}


async def status(call: Call) -> Any:
    """The status snapshot (as in status.json), plus the optimiser's mode and the version."""
    gateway = call.gateway
    snap = gateway.status().to_json()
    mode = gateway.optimizer_mode()
    snap["optimizer"] = {"mode": mode} if mode is not None else None
    snap["version"] = __version__
    return snap


async def read(call: Call) -> Any:
    names = call.arg("points", list)
    rows = call.gateway.current()
    if names is None:
        return rows
    known = {row["name"]: row for row in rows}
    bad = [n for n in names if not isinstance(n, str) or n not in known]
    if bad:
        raise CommandError("bad_args", f"points: unknown point(s) {', '.join(map(str, bad[:10]))}")
    return [known[n] for n in names]


async def history(call: Call) -> Any:
    point = call.arg("point", str)
    if point not in {name for name, _, _ in call.gateway.config.all_points()}:
        raise CommandError("bad_args", f'point: no point "{point}"')
    since, limit = since_arg(call, "10m"), limit_arg(call, 1000, 10_000)
    return await call.gateway.query(lambda twin: twin.history(point, since, limit=limit))


async def events(call: Call) -> Any:
    kind = call.arg("kind", str)
    since, limit = since_arg(call, "1d"), limit_arg(call, 100, 1000)
    return await call.gateway.query(lambda twin: twin.events(since, limit=limit, kind=kind))


async def audit(call: Call) -> Any:
    """Who did what and when: command records and every write attempt through the gate."""
    since, limit = since_arg(call, "1d"), limit_arg(call, 100, 1000)

    def both(twin: TwinView) -> dict[str, Any]:
        return {"commands": twin.events(since, limit=limit, kind="command"), "writes": twin.writes(since, limit=limit)}

    return await call.gateway.query(both)


# --------------------------------------------------------------------------- operator


async def write(call: Call) -> Any:
    """Through the safety gate only; answered with its verdict and the read-back."""
    point = call.arg("point", str)
    value = call.arg("value", (int, float, str, bool))
    if isinstance(value, int | float) and not isinstance(value, bool) and not finite(value):
        raise CommandError("bad_args", "value: expected a finite number")
    verdict = await call.gateway.request_write(point, value, source="operator", actor=call.operator.name)
    record = verdict.record()
    if not verdict.ok:
        code = "rejected" if verdict.result == "rejected" else "failed"
        raise CommandError(code, f"write {point} = {value!r} {verdict.result}: {verdict.reason}", detail=record)
    return record


async def set_mode(call: Call) -> Any:
    mode = call.arg("mode", str)
    if mode not in OPTIMIZER_MODES:
        raise CommandError("bad_args", f"mode: expected one of {', '.join(OPTIMIZER_MODES)}, got {mode!r}")
    before = call.gateway.optimizer_mode()
    if before is None:
        raise CommandError("unavailable", "no optimiser is configured on this gateway")
    call.gateway.set_optimizer_mode(mode, f"command {call.envelope.id} by {call.operator.name}")
    return {"mode": call.gateway.optimizer_mode(), "previous": before}


async def ack(call: Call) -> Any:
    event_id = call.arg("event", int)
    if not 0 < event_id < 2**63:
        raise CommandError("bad_args", f"event: expected an event id, got {event_id}")
    name, now = call.operator.name, time.time()
    acked = await call.gateway.query(lambda twin: twin.ack_event(event_id, name, now))
    if acked is None:
        raise CommandError("bad_args", f"event: no event {event_id}")
    acked["released"] = call.gateway.event_acked(event_id, name)  # points whose override hold it lifted
    return acked


COMMANDS: dict[str, Spec] = {
    "ping": Spec("viewer", ping),
    "status": Spec("viewer", status),
    "read": Spec("viewer", read, optional=("points",)),
    "history": Spec("viewer", history, required=("point",), optional=("since", "limit")),
    "events": Spec("viewer", events, optional=("since", "limit", "kind")),
    "audit": Spec("viewer", audit, optional=("since", "limit")),
    "write": Spec("operator", write, required=("point", "value")),
    "set_mode": Spec("operator", set_mode, required=("mode",)),
    "ack": Spec("operator", ack, required=("event",)),
    "get_config": Spec("admin", admin.get_config),
    "set_config": Spec("admin", admin.set_config, required=("config",)),
    "reload": Spec("admin", admin.reload),
    "update_model": Spec("admin", admin.update_model, required=("name", "onnx", "sha256")),
    "restart_driver": Spec("admin", admin.restart_driver, required=("device",)),
}
