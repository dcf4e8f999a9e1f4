"""Admin commands: get_config, set_config, reload, update_model, restart_driver.

Config push (``set_config``). The text is validated first (the same messages as check-config);
identical text is a no-op. A config that changes agent.* or twin.* is refused (it would move the
data directory, or the gateway's identity and with it the topic the operator reaches it on: do
that locally). One that would turn remote management off, or leave no admin whose key loads, is
refused too: it could never be undone remotely. Otherwise the file is replaced atomically, the
previous one kept as ``<file>.bak`` (with the file's own mode: it may hold passwords), and applied
by the agent's hot reload. A file that cannot be written is answered ``failed`` and nothing is
applied; under the shipped systemd unit the config folder ``/etc/edge-agent`` is writable for the
service (``ReadWritePaths=``, see systemd/README.md), so a pushed config survives a restart. *Healthy* then means,
within ``[commands] config_deadline``: every device that was up before and is still configured is
up again, no model that was ready has failed, no device or model task died, and the MQTT link, if
it was connected, is connected again. If not, the backup goes back in place, is reloaded, and the
answer is ``rolled_back`` with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, load, loads
from edge_agent.errors import CommandError, ConfigError, ModelError
from edge_agent.remote.call import Call
from edge_agent.remote.envelope import Keyring
from edge_agent.remote.gateway import Gateway
from edge_agent.service.status import GatewayStatus

log = logging.getLogger(__name__)

HEALTH_POLL = 0.1  # seconds between health checks after a config push


async def get_config(call: Call) -> Any:
    source = call.gateway.config.source
    text = await asyncio.to_thread(source.read_text, "utf-8")
    return {"file": str(source), "config": text}


async def reload(call: Call) -> Any:
    """Re-read the config file from disk, as SIGHUP does."""
    gateway = call.gateway
    try:
        new = await asyncio.to_thread(load, gateway.config.source)
    except ConfigError as exc:
        raise CommandError("invalid_config", "the config file does not validate; the running config stays",
                           detail={"problems": exc.problems}) from None
    _check_applicable(gateway, new, call.keyring)
    async with _config_lock(call):
        summary = await gateway.reload(new)
    return {"applied": summary}


async def set_config(call: Call) -> Any:
    gateway = call.gateway
    text = call.arg("config", str)
    source = gateway.config.source
    current = await asyncio.to_thread(source.read_text, "utf-8")
    if text == current:
        return {"changed": False, "applied": "unchanged"}
    try:
        new = loads(text, source)
    except ConfigError as exc:
        raise CommandError("invalid_config", f"config refused, {len(exc.problems)} problem(s); the running "
                                             "config stays", detail={"problems": exc.problems}) from None
    _check_applicable(gateway, new, call.keyring)
    backup = source.with_name(source.name + ".bak")
    async with _config_lock(call):
        before = Baseline.of(gateway.status())
        try:
            await asyncio.to_thread(atomic_write, source, text.encode("utf-8"), backup=backup)
        except OSError as exc:
            raise CommandError("failed", f"cannot write {source} ({exc.strerror or exc}); nothing was applied. "
                                         "The agent needs write access to its config folder (systemd/README.md: "
                                         "remote management)") from None
        log.warning("commands: %s pushed a new config to %s (previous kept in %s)", call.operator.name, source, backup)
        try:
            summary = await gateway.reload(new)
            problem = await before.wait_healthy(gateway, gateway.config.commands.config_deadline)
        except Exception as exc:  # whatever broke the reload, the answer is the old config back
            log.exception("commands: reload with the pushed config failed")
            problem = f"reload failed: {exc}"
            summary = ""
        if problem is None:
            return {"changed": True, "applied": summary, "backup": str(backup)}
        restored = await _roll_back(gateway, source, backup, current, problem)
    raise CommandError("rolled_back", f"not healthy with the new config within "
                                      f"{new.commands.config_deadline:g} s ({problem}); rolled back to the "
                                      f"previous config", detail={"reason": problem, "restored": restored})


async def _roll_back(gateway: Gateway, source: Path, backup: Path, text: str, problem: str) -> str:
    log.error("commands: pushed config not healthy (%s); rolling back to %s", problem, backup)
    await asyncio.to_thread(atomic_write, source, text.encode("utf-8"))
    old = loads(text, source)
    summary = await gateway.reload(old)
    gateway.record_event({"ts": time.time(), "source": "commands", "kind": "config", "state": "rolled_back",
                        "message": f"pushed config rolled back: {problem}"})
    return summary


def _check_applicable(gateway: Gateway, new: AgentConfig, keyring: Keyring) -> None:
    if gateway.needs_restart(new):
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
        self.lock = call.config_lock

    async def __aenter__(self) -> None:
        if self.lock.locked():
            raise CommandError("busy", "another config change is in progress")
        await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


@dataclass(frozen=True)
class Baseline:
    """What was healthy before a config change, to judge the gateway after it."""

    devices_up: frozenset[str]
    models_ready: frozenset[str]
    mqtt_connected: bool

    @classmethod
    def of(cls, status: GatewayStatus) -> Baseline:
        return cls(status.devices_up, status.models_ready, status.mqtt_connected)

    def problems(self, status: GatewayStatus) -> tuple[list[str], bool]:
        """(what is not healthy yet, whether it is final: a failed model or a dead task)."""
        final = list(status.dead_parts)
        models = {m.name: m for m in status.models}
        final += [f"model {n} failed: {models[n].last_error}" for n in sorted(self.models_ready)
                  if n in models and models[n].state == "failed"]
        devices = {d.name: d for d in status.devices}
        waiting = [f"device {n} is {devices[n].state}"
                   + (f" ({devices[n].last_error})" if devices[n].last_error else "")
                   for n in sorted(self.devices_up) if n in devices and devices[n].state != "up"]
        waiting += [f"model {n} is still loading" for n in sorted(self.models_ready)
                    if n in models and models[n].state == "loading"]
        if self.mqtt_connected and not status.mqtt_connected:
            error = status.mqtt.last_error if status.mqtt else ""
            waiting.append("the MQTT link is not connected" + (f" ({error})" if error else ""))
        return final + waiting, bool(final)

    async def wait_healthy(self, gateway: Gateway, deadline: float) -> str | None:
        """None once healthy; else what was still wrong at the deadline (or at once when final)."""
        ends = time.monotonic() + deadline
        while True:
            problems, final = self.problems(gateway.status())
            if not problems:
                return None
            if final or time.monotonic() >= ends:
                return "; ".join(problems)
            await asyncio.sleep(HEALTH_POLL)


async def update_model(call: Call) -> Any:
    """Verify (sha256), validate and hot-swap an ONNX model; the running one stays on any failure."""
    name, data, digest = call.arg("name", str), call.arg("onnx", str), call.arg("sha256", str)
    gateway = call.gateway
    if name not in gateway.model_names():
        known = ", ".join(gateway.model_names()) or "none"
        raise CommandError("bad_args", f'name: no model "{name}"; configured: {known}')
    try:
        blob = await asyncio.to_thread(base64.b64decode, data, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_args", "onnx: expected the model file as base64") from None
    actual = await asyncio.to_thread(lambda: hashlib.sha256(blob).hexdigest())
    if actual != digest.strip().lower():
        raise CommandError("hash_mismatch", f"sha256 of the {len(blob)} bytes is {actual}, not {digest}; "
                                            "model not changed")
    configured = next(m.file for m in gateway.config.models if m.name == name)
    # Written next to the model file first: a file that cannot be saved must not be swapped in, or a
    # restart would silently bring the old model back.
    try:
        staged = await asyncio.to_thread(stage, configured, blob)
    except OSError as exc:
        raise CommandError("failed", f"cannot write {configured} ({exc.strerror or exc}); the running model is "
                                     "kept. A model that update_model may replace must be in a folder the agent can "
                                     "write (systemd/README.md: remote management)") from None
    try:
        try:
            file, inputs = await gateway.swap_model(name, blob, f"update by {call.operator.name} "
                                                                f"(sha256 {actual[:12]})")
        except ModelError as exc:
            raise CommandError("invalid_model", f"{exc}; the running model is kept") from None
        await asyncio.to_thread(commit, staged, file, backup=file.with_name(file.name + ".bak"))
    except OSError as exc:
        raise CommandError("failed", f"model swapped in but not saved to {configured} ({exc}); a restart would load "
                                     "the previous file") from None
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()  # gone already when committed
    return {"model": name, "sha256": actual, "bytes": len(blob), "file": str(file), "inputs": list(inputs)}


async def restart_driver(call: Call) -> Any:
    device = call.arg("device", str)
    gateway = call.gateway
    if gateway.status().device(device) is None or all(d.name != device for d in gateway.config.devices):
        raise CommandError("bad_args", f'device: no device "{device}"')
    await gateway.restart_device(device)
    ends = time.monotonic() + min(10.0, gateway.config.commands.config_deadline)
    state = gateway.status().device(device)
    while state is not None and state.state == "connecting" and time.monotonic() < ends:
        await asyncio.sleep(HEALTH_POLL)
        state = gateway.status().device(device)
    return {"device": device, "state": state.state if state else "removed",
            "last_error": state.last_error if state else ""}


def _mode(path: Path) -> int:
    """The permission bits a replacement of ``path`` gets: the file's own (0600 for a new one)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o600


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` afresh with ``mode`` (never through a symlink, never readable by others first)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask must not widen or narrow it
        f.write(data)
        f.flush()
        os.fsync(fd)


def stage(path: Path, data: bytes) -> Path:
    """Write ``data`` next to ``path`` (``.<name>.tmp``, fsynced, ``path``'s mode); :func:`commit` puts it in place."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_new(tmp, data, _mode(path))
    return tmp


def commit(staged: Path, path: Path, *, backup: Path | None = None) -> None:
    """Rename ``staged`` over ``path``; copy the old ``path`` to ``backup`` first (with its mode)."""
    if backup is not None and path.exists():
        backup_tmp = backup.with_name(f".{backup.name}.tmp")
        _write_new(backup_tmp, path.read_bytes(), _mode(path))
        os.replace(backup_tmp, backup)
    os.replace(staged, path)
    with contextlib.suppress(OSError):  # the rename itself is durable once the folder is
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, *, backup: Path | None = None) -> None:
    """Replace ``path`` atomically (temp file, fsync, rename) keeping its mode; copy the old one to ``backup`` first."""
    staged = stage(path, data)
    try:
        commit(staged, path, backup=backup)
    except BaseException:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise
