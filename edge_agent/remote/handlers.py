"""What each remote command does (see :mod:`edge_agent.remote.dispatch` for the envelope, checks and codes).

viewer: ping, status, read, history, events, audit; operator: write, set_mode, ack; admin:
get_config, set_config, reload, update_model, restart_driver. Nothing here runs a shell, reads an
arbitrary file or executes code: get_config returns the agent's own config file and nothing else.

Config push (``set_config``). The text is validated first (the same messages as check-config);
identical text is a no-op. A config that changes agent.* or twin.* is refused (it would move the
data directory, or the gateway's identity and with it the topic the operator reaches it on: do
that locally). One that would turn remote management off, or leave no admin whose key loads, is
refused too: it could never be undone remotely. Otherwise the file is replaced atomically, the
previous one kept as ``<file>.bak``, and applied by the agent's hot reload. *Healthy* then means,
within ``[commands] config_deadline``: every device that was up before and is still configured is
up again, no model that was ready has failed, no device or model task died, and the MQTT link, if
it was connected, is connected again. If not, the backup goes back in place, is reloaded, and the
answer is ``rolled_back`` with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.config import OPTIMIZER_MODES, AgentConfig, load, loads
from edge_agent.errors import ConfigError, ModelError
from edge_agent.remote.dispatch import (
    Call,
    CommandError,
    Keyring,
    Spec,
    ack_event,
    atomic_write,
    finite,
    limit_arg,
    since_arg,
    status,
)

if TYPE_CHECKING:
    from edge_agent.agent import Agent

log = logging.getLogger(__name__)

HEALTH_POLL = 0.1  # seconds between health checks after a config push


# --------------------------------------------------------------------------- viewer


async def ping(call: Call) -> Any:
    return {"pong": True, "ts": time.time(), "gateway": call.agent.config.agent.id}


async def get_status(call: Call) -> Any:
    return status(call.agent)


async def read(call: Call) -> Any:
    names = call.arg("points", list)
    rows = call.agent.snapshot()
    if names is None:
        return rows
    known = {row["name"]: row for row in rows}
    bad = [n for n in names if not isinstance(n, str) or n not in known]
    if bad:
        raise CommandError("bad_args", f"points: unknown point(s) {', '.join(map(str, bad[:10]))}")
    return [known[n] for n in names]


async def history(call: Call) -> Any:
    point = call.arg("point", str)
    if point not in {name for name, _, _ in call.agent.config.all_points()}:
        raise CommandError("bad_args", f'point: no point "{point}"')
    since, limit = since_arg(call, "10m"), limit_arg(call, 1000, 10_000)
    return await _query(call, lambda twin: twin.history(point, since, limit=limit))


async def events(call: Call) -> Any:
    kind = call.arg("kind", str)
    since, limit = since_arg(call, "1d"), limit_arg(call, 100, 1000)
    rows = await _query(call, lambda twin: twin.events(since, limit=None if kind else limit))
    if kind is not None:
        rows = [r for r in rows if r["kind"] == kind][-limit:]
    return rows


async def audit(call: Call) -> Any:
    """Who did what and when: command records and every write attempt through the gate."""
    since, limit = since_arg(call, "1d"), limit_arg(call, 100, 1000)

    def both(twin: Any) -> dict[str, Any]:
        commands = [e for e in twin.events(since) if e["kind"] == "command"][-limit:]
        return {"commands": commands, "writes": twin.writes(since, limit=limit)}

    return await _query(call, both)


async def _query(call: Call, fn: Any) -> Any:
    return await asyncio.to_thread(call.handler.reader.call, call.agent.config.twin_path, fn)


# --------------------------------------------------------------------------- operator


async def write(call: Call) -> Any:
    """Through the safety gate only; answered with its verdict and the read-back."""
    point = call.arg("point", str)
    value = call.arg("value", (int, float, str, bool))
    if isinstance(value, int | float) and not isinstance(value, bool) and not finite(value):
        raise CommandError("bad_args", "value: expected a finite number")
    verdict = await call.agent.gate.request(point, value, source="operator", actor=call.operator.name)
    record = verdict.record()
    if not verdict.ok:
        code = "rejected" if verdict.result == "rejected" else "failed"
        raise CommandError(code, f"write {point} = {value!r} {verdict.result}: {verdict.reason}", detail=record)
    return record


async def set_mode(call: Call) -> Any:
    mode = call.arg("mode", str)
    if mode not in OPTIMIZER_MODES:
        raise CommandError("bad_args", f"mode: expected one of {', '.join(OPTIMIZER_MODES)}, got {mode!r}")
    optimizer = call.agent.optimizer
    if optimizer is None:
        raise CommandError("unavailable", "no optimiser is configured on this gateway")
    before = optimizer.mode
    optimizer.set_mode(mode, reason=f"command {call.envelope.id} by {call.operator.name}")
    return {"mode": optimizer.mode, "previous": before}


async def ack(call: Call) -> Any:
    event_id = call.arg("event", int)
    if not 0 < event_id < 2**63:
        raise CommandError("bad_args", f"event: expected an event id, got {event_id}")
    name, now = call.operator.name, time.time()
    return await _query(call, lambda twin: ack_event(twin, event_id, name, now))


# --------------------------------------------------------------------------- admin


async def get_config(call: Call) -> Any:
    source = call.agent.config.source
    text = await asyncio.to_thread(source.read_text, "utf-8")
    return {"file": str(source), "config": text}


async def reload(call: Call) -> Any:
    """Re-read the config file from disk, as SIGHUP does."""
    agent = call.agent
    try:
        new = await asyncio.to_thread(load, agent.config.source)
    except ConfigError as exc:
        raise CommandError("invalid_config", "the config file does not validate; the running config stays",
                           detail={"problems": exc.problems}) from None
    _check_applicable(agent, new, call.handler.keyring)
    async with _config_lock(call):
        summary = await agent.reload(new)
    return {"applied": summary}


async def set_config(call: Call) -> Any:
    agent = call.agent
    text = call.arg("config", str)
    source = agent.config.source
    current = await asyncio.to_thread(source.read_text, "utf-8")
    if text == current:
        return {"changed": False, "applied": "unchanged"}
    try:
        new = loads(text, source)
    except ConfigError as exc:
        raise CommandError("invalid_config", f"config refused, {len(exc.problems)} problem(s); the running "
                                             "config stays", detail={"problems": exc.problems}) from None
    _check_applicable(agent, new, call.handler.keyring)
    backup = source.with_name(source.name + ".bak")
    async with _config_lock(call):
        before = Baseline.of(agent)
        await asyncio.to_thread(atomic_write, source, text.encode("utf-8"), backup=backup)
        log.warning("commands: %s pushed a new config to %s (previous kept in %s)", call.operator.name, source, backup)
        try:
            summary = await agent.reload(new)
            problem = await before.wait_healthy(agent, agent.config.commands.config_deadline)
        except Exception as exc:  # whatever broke the reload, the answer is the old config back
            log.exception("commands: reload with the pushed config failed")
            problem = f"reload failed: {exc}"
            summary = ""
        if problem is None:
            return {"changed": True, "applied": summary, "backup": str(backup)}
        restored = await _roll_back(agent, source, backup, current, problem)
    raise CommandError("rolled_back", f"not healthy with the new config within "
                                      f"{new.commands.config_deadline:g} s ({problem}); rolled back to the "
                                      f"previous config", detail={"reason": problem, "restored": restored})


async def _roll_back(agent: Agent, source: Path, backup: Path, text: str, problem: str) -> str:
    log.error("commands: pushed config not healthy (%s); rolling back to %s", problem, backup)
    await asyncio.to_thread(atomic_write, source, text.encode("utf-8"))
    old = loads(text, source)
    summary = await agent.reload(old)
    agent.record_event({"ts": time.time(), "source": "commands", "kind": "config", "state": "rolled_back",
                        "message": f"pushed config rolled back: {problem}"})
    return summary


def _check_applicable(agent: Agent, new: AgentConfig, keyring: Keyring) -> None:
    if agent.needs_restart(new):
        raise CommandError("needs_restart", "agent.* or twin.* changed (data directory, identity or topics): "
                                            "not applied remotely; change it locally and restart the agent")
    usable = []
    for operator in new.commands.operators:
        if operator.role == "admin":
            try:
                keyring.key(operator)
                usable.append(operator.name)
            except CommandError:
                continue
    if not new.commands.enabled or not usable:
        raise CommandError("invalid_config", "this config would leave no admin able to send commands, which "
                                             "could not be undone remotely; refused")


class _config_lock:
    """The one config change at a time; a second one is answered ``busy``, not queued."""

    def __init__(self, call: Call) -> None:
        self.lock = call.handler.config_lock

    async def __aenter__(self) -> None:
        if self.lock.locked():
            raise CommandError("busy", "another config change is in progress")
        await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


@dataclass(frozen=True)
class Baseline:
    """What was healthy before a config change, to judge the agent after it."""

    devices_up: frozenset[str]
    models_ready: frozenset[str]
    mqtt_connected: bool

    @classmethod
    def of(cls, agent: Agent) -> Baseline:
        return cls(frozenset(n for n, r in agent.runners.items() if r.status.state == "up"),
                   frozenset(n for n, m in agent.models.items() if m.status.state == "ready"),
                   agent.sync is not None and agent.sync.link.connected.is_set())

    def problems(self, agent: Agent) -> tuple[list[str], bool]:
        """(what is not healthy yet, whether it is final: a failed model or a dead task)."""
        final = [f"{key} task died: {task.exception()!r}" for key, task in agent._parts.items()
                 if task.done() and not task.cancelled() and task.exception() is not None]
        final += [f"model {n} failed: {agent.models[n].status.last_error}" for n in self.models_ready
                  if n in agent.models and agent.models[n].status.state == "failed"]
        waiting = [f"device {n} is {agent.runners[n].status.state}"
                   + (f" ({agent.runners[n].status.last_error})" if agent.runners[n].status.last_error else "")
                   for n in sorted(self.devices_up) if n in agent.runners and agent.runners[n].status.state != "up"]
        waiting += [f"model {n} is still loading" for n in self.models_ready
                    if n in agent.models and agent.models[n].status.state == "loading"]
        if self.mqtt_connected and (agent.sync is None or not agent.sync.link.connected.is_set()):
            waiting.append("the MQTT link is not connected" + (f" ({agent.sync.link.last_error})"
                                                                if agent.sync and agent.sync.link.last_error else ""))
        return final + waiting, bool(final)

    async def wait_healthy(self, agent: Agent, deadline: float) -> str | None:
        """None once healthy; else what was still wrong at the deadline (or at once when final)."""
        ends = time.monotonic() + deadline
        while True:
            problems, final = self.problems(agent)
            if not problems:
                return None
            if final or time.monotonic() >= ends:
                return "; ".join(problems)
            await asyncio.sleep(HEALTH_POLL)


async def update_model(call: Call) -> Any:
    """Verify (sha256), validate and hot-swap an ONNX model; the running one stays on any failure."""
    name, data, digest = call.arg("name", str), call.arg("onnx", str), call.arg("sha256", str)
    runner = call.agent.models.get(name)
    if runner is None:
        raise CommandError("bad_args", f'name: no model "{name}"; configured: {", ".join(call.agent.models) or "none"}')
    try:
        blob = await asyncio.to_thread(base64.b64decode, data, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_args", "onnx: expected the model file as base64") from None
    actual = await asyncio.to_thread(lambda: hashlib.sha256(blob).hexdigest())
    if actual != digest.strip().lower():
        raise CommandError("hash_mismatch", f"sha256 of the {len(blob)} bytes is {actual}, not {digest}; "
                                            "model not changed")
    try:
        loaded = await runner.swap(blob, f"update by {call.operator.name} (sha256 {actual[:12]})")
    except ModelError as exc:
        raise CommandError("invalid_model", f"{exc}; the running model is kept") from None
    file = runner.cfg.file
    try:
        await asyncio.to_thread(atomic_write, file, blob, backup=file.with_name(file.name + ".bak"))
    except OSError as exc:
        raise CommandError("failed", f"model swapped in but not saved to {file} ({exc}); a restart would load "
                                     "the previous file") from None
    return {"model": name, "sha256": actual, "bytes": len(blob), "file": str(file), "inputs": list(loaded.inputs)}


async def restart_driver(call: Call) -> Any:
    device = call.arg("device", str)
    agent = call.agent
    settings = next((d for d in agent.config.devices if d.name == device), None)
    if settings is None or device not in agent.runners:
        raise CommandError("bad_args", f'device: no device "{device}"')
    await agent.restart_device(device)
    runner = agent.runners[device]
    ends = time.monotonic() + min(10.0, agent.config.commands.config_deadline)
    while runner.status.state == "connecting" and time.monotonic() < ends:  # noqa: ASYNC110 - a plain attribute
        await asyncio.sleep(HEALTH_POLL)
    return {"device": device, "state": runner.status.state, "last_error": runner.status.last_error}


COMMANDS: dict[str, Spec] = {
    "ping": Spec("viewer", ping),
    "status": Spec("viewer", get_status),
    "read": Spec("viewer", read, optional=("points",)),
    "history": Spec("viewer", history, required=("point",), optional=("since", "limit")),
    "events": Spec("viewer", events, optional=("since", "limit", "kind")),
    "audit": Spec("viewer", audit, optional=("since", "limit")),
    "write": Spec("operator", write, required=("point", "value")),
    "set_mode": Spec("operator", set_mode, required=("mode",)),
    "ack": Spec("operator", ack, required=("event",)),
    "get_config": Spec("admin", get_config),
    "set_config": Spec("admin", set_config, required=("config",)),
    "reload": Spec("admin", reload),
    "update_model": Spec("admin", update_model, required=("name", "onnx", "sha256")),
    "restart_driver": Spec("admin", restart_driver, required=("device",)),
}
