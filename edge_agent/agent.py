"""The supervisor: starts and stops the parts, reloads on SIGHUP, owns shutdown. It wires; it holds little logic.

Parts: one :class:`~edge_agent.device.DeviceRunner` task per device, the twin writer
(:class:`~edge_agent.store.writer.TwinWriter`, which also keeps every point's latest reading),
the cloud sync (:mod:`edge_agent.cloud`), the models and the optimiser (:mod:`edge_agent.control`),
the safety gate, remote commands (:mod:`edge_agent.remote`) and the service reporters
(:mod:`edge_agent.service`). The parts never see the agent: the gate and the models get the few
lookups they need as functions, the reporters a frozen :class:`GatewayStatus`, and remote
commands the :class:`~edge_agent.remote.gateway.Gateway` protocol, which the agent implements.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from drivers.base import Driver, Reading
from edge_agent.config import AgentConfig, DeviceConfig, ModelConfig
from edge_agent.control.gate import SafetyGate, WriteResult
from edge_agent.device import DeviceRunner
from edge_agent.errors import ModelError, TwinError
from edge_agent.service import status as status_file
from edge_agent.service.logs import RecentErrors
from edge_agent.service.status import GatewayStatus, LinkState, ModelState, OverrideState
from edge_agent.store import sqlite
from edge_agent.store.messages import OutboxLimits
from edge_agent.store.outbox import Outbox
from edge_agent.store.twin import Twin
from edge_agent.store.views import TwinReader, TwinView
from edge_agent.store.writer import TwinWriter
from edge_agent.tasks import cancel_all

if TYPE_CHECKING:
    from edge_agent.cloud.edge_node import EdgeNode
    from edge_agent.cloud.sync import Sync
    from edge_agent.control.inference import ModelRunner
    from edge_agent.control.optimizer import Optimizer
    from edge_agent.remote.desired import DesiredState
    from edge_agent.remote.dispatch import CommandHandler
    from edge_agent.store.twin import DesiredClaim, DesiredDocument

log = logging.getLogger(__name__)
STATUS_INTERVAL = 5.0  # seconds between refreshes of data_dir/status.json
T = TypeVar("T")

DriverFactory = Callable[[DeviceConfig, Path], Driver]


class Agent:
    """Runs the gateway for one validated config until ``stop`` is set."""

    def __init__(self, config: AgentConfig, *, driver_factory: DriverFactory | None = None) -> None:
        self._config = config
        self.started = time.time()
        self.writer: TwinWriter | None = None
        self.outbox: Outbox | None = None
        self.sync: Sync | None = None
        self.commands: CommandHandler | None = None
        self.edge_node: EdgeNode | None = None  # the Sparkplug B edge node ([sparkplug] enabled)
        self.edge_outbox: Outbox | None = None
        self.desired: DesiredState | None = None  # the cloud's desired state, with commands
        self.runners: dict[str, DeviceRunner] = {}
        self.models: dict[str, ModelRunner] = {}
        self.optimizer: Optimizer | None = None
        self._owner = {point.name: device.name for device, point in config.points()}
        self.gate = SafetyGate(config, self.last_value, self._driver_for, self.anomaly_active, self._record_write,
                               self.submit, on_rollback=self._on_rollback, age=self.data_age,
                               on_event=self.record_event)
        self._driver_factory = driver_factory
        self._tasks: list[asyncio.Task[None]] = []
        self._parts: dict[str, asyncio.Task[None]] = {}  # "device:NAME" / "model:NAME" -> its task
        self._reader = TwinReader(config.twin_path)
        self.recent_errors: deque[str] = deque(maxlen=10)
        self._recorder = RecentErrors(self.recent_errors)
        self.storage: list[str] = []  # files set aside or not usable at start (status.json "storage")
        self._status_failing = False

    @property
    def config(self) -> AgentConfig:
        return self._config

    # ------------------------------------------------------------------ the data path (see TwinWriter)

    @property
    def latest(self) -> Mapping[str, Reading]:
        """The latest reading of every point (empty before start)."""
        return self.writer.latest if self.writer is not None else {}

    def submit(self, readings: Sequence[Reading]) -> None:
        """Accept readings from a device or a model (on the event loop); stored at the next flush."""
        if self.writer is not None:
            self.writer.submit(readings)

    async def room(self) -> None:
        """Back-pressure: pollers wait here while the twin is behind."""
        if self.writer is not None:
            await self.writer.room()

    def record_event(self, event: dict[str, Any]) -> None:
        """Accept an event (anomaly, device outage, command audit); stored and published at the next flush."""
        if self.writer is not None:
            self.writer.record("event", event)

    async def flush(self, *, final: bool = False) -> int:
        """Store what is pending now (tests and shutdown; the writer does this on its own)."""
        if self.writer is None:
            return 0
        return await self.writer.flush(final=final)

    @property
    def stored(self) -> int:
        """History rows written since start."""
        return self.writer.stored if self.writer is not None else 0

    # ------------------------------------------------------------------ lookups for the gate and the models

    def last_value(self, point: str) -> Reading | None:
        return self.latest.get(point)

    def data_age(self, point: str, reading: Reading) -> float:
        """Seconds since ``reading`` was known to be current.

        A subscribed OPC UA value is sent only when it changes, so its timestamp ages while it
        stays right; while the subscription is alive (checked every interval) it is current.
        """
        now = time.time()
        owner = self._owner.get(point)
        runner = self.runners.get(owner) if owner else None
        if runner is not None and runner.subscribe and runner.status.state == "up" and reading.quality == "good":
            return now - max(reading.ts, runner.status.last_ok)
        return now - reading.ts

    def anomaly_active(self, equipment: str) -> list[str]:
        """Names of the models with an active anomaly on this equipment (device)."""
        return [name for name, runner in self.models.items()
                if runner.anomaly_active and runner.equipment == equipment]

    def _driver_for(self, device: str) -> Driver | None:
        runner = self.runners.get(device)
        return runner.driver if runner is not None and runner.status.state == "up" else None

    def _record_write(self, result: WriteResult) -> None:
        record = result.record()
        record["configured"] = result.point in self.gate.points  # no desired state for unknown points
        if self.writer is not None:
            self.writer.record("write", record)

    def _on_rollback(self, reason: str) -> None:
        if self.optimizer is not None:
            self.optimizer.set_mode("advise", reason=f"rollback: {reason}")
        self.record_event({"ts": time.time(), "source": "gate", "kind": "rollback", "state": "raised",
                           "message": reason})

    # ------------------------------------------------------------------ the face (status, and remote.Gateway)

    def status(self) -> GatewayStatus:
        """A frozen snapshot for status.json, metrics, sd_notify and remote commands."""
        now = time.time()
        config = self._config
        assert self.writer is not None, "status() before start()"
        dead = tuple(f"{key} task died: {task.exception()!r}" for key, task in self._parts.items()
                     if task.done() and not task.cancelled() and task.exception() is not None)
        return GatewayStatus(
            ts=now, started=self.started, gateway=config.agent.id, site=config.agent.site, config=config.source,
            devices=tuple(copy.copy(r.status) for r in self.runners.values()),
            models=tuple(_model_state(name, m) for name, m in self.models.items()),
            twin=self.writer.state(), mqtt=self._link_state(),
            optimizer_mode=self.optimizer.mode if self.optimizer is not None else None,
            dead_parts=dead, errors=tuple(self.recent_errors),
            overrides=tuple(OverrideState(h.point, h.since, h.until, h.event_id, h.old, h.new)
                            for h in self.gate.holds()),
            sparkplug=self._sparkplug_state(), storage=tuple(self.storage))

    def _link_state(self) -> LinkState | None:
        sync, outbox = self.sync, self.outbox
        if sync is None or outbox is None:
            return None
        link = sync.link
        try:
            stats, error = outbox.stats(), ""
        except TwinError as exc:
            stats, error = None, str(exc)
        return LinkState(f"{link.cfg.host}:{link.cfg.port}", link.connected.is_set(), link.last_error, sync.published,
                         sync.acked, stats, error)

    def _sparkplug_state(self) -> LinkState | None:
        node, outbox = self.edge_node, self.edge_outbox
        if node is None or outbox is None:
            return None
        try:
            stats, error = outbox.stats(), ""
        except TwinError as exc:
            stats, error = None, str(exc)
        return LinkState(f"{node.cfg.host}:{node.cfg.port}", node.link.connected.is_set(), node.link.last_error,
                         node.published, node.acked, stats, error)

    def current(self) -> list[dict[str, Any]]:
        """Every configured point's latest value, quality, source time and unit (from memory)."""
        latest = self.latest
        rows = []
        for name, _, unit in self._config.all_points():
            r = latest.get(name)
            rows.append({"name": name, "value": r.value if r else None, "quality": r.quality if r else "bad",
                         "ts": r.ts if r else None, "unit": unit})
        return rows

    def twin_points(self) -> list[dict[str, Any]]:
        """:meth:`current`, plus each point's desired state (``desired``) when it has one: the retained twin."""
        desired = self.writer.desired if self.writer is not None else {}
        return [{**row, "desired": desired.get(row["name"])} for row in self.current()]

    def data_ready(self, point: str) -> bool:
        owner = self._owner.get(point)
        runner = self.runners.get(owner) if owner else None
        if runner is None:
            return True
        state = runner.status
        return state.state == "down" or (state.state == "up" and state.reads + state.updates > 0)

    async def claim_desired(self, document: DesiredDocument) -> DesiredClaim:
        if self.writer is None:
            raise TwinError("the twin is not open")
        return await self.writer.claim_desired(document)

    async def query(self, fn: Callable[[TwinView], T]) -> T:
        """Run ``fn`` on the agent's own read connection to the twin, off the event loop."""
        return await asyncio.to_thread(self._reader.call, fn)

    async def request_write(self, point: str, value: Any, *, source: str, actor: str | None) -> WriteResult:
        return await self.gate.request(point, value, source=source, actor=actor)

    def event_acked(self, event_id: int, operator: str) -> list[str]:
        return self.gate.acknowledged(event_id, operator)

    def optimizer_mode(self) -> str | None:
        return self.optimizer.mode if self.optimizer is not None else None

    def set_optimizer_mode(self, mode: str, reason: str) -> None:
        if self.optimizer is not None:
            self.optimizer.set_mode(mode, reason=reason)

    def model_names(self) -> list[str]:
        return list(self.models)

    async def swap_model(self, name: str, model: bytes, source: str) -> tuple[Path, tuple[str, ...]]:
        runner = self.models.get(name)
        if runner is None:
            raise ModelError(f'model "{name}": not configured')
        loaded = await runner.swap(model, source)
        return runner.cfg.file, loaded.inputs

    async def respond(self, topic: str | None, payload: bytes, correlation: bytes | None) -> bool:
        if self.sync is None:
            return False
        await self.sync.respond(topic, payload, correlation)
        return True

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task of the agent's: logged if it dies, cancelled when the agent stops."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_task_done)
        self._tasks.append(task)
        return task

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the twin and start every task; returns once they are running."""
        config = self._config
        logging.getLogger().addHandler(self._recorder)
        twin = await asyncio.to_thread(self._open_store, config.twin_path, Twin.open, "the twin",
                                       "readings are kept in memory only, lost on restart")
        self.writer = TwinWriter(twin, config.twin)
        try:
            await asyncio.to_thread(twin.sync_points, config)
            await asyncio.to_thread(self.writer.restore)
        except TwinError as exc:  # a full disk or a locked file: run, and keep trying to write
            log.error("%s; the agent runs and tries again at every flush", exc)
            self.writer.sync_points_later(config)
        await self._restore_gate(twin)
        for notice in self.storage:
            self.record_event({"ts": time.time(), "source": "storage", "kind": "storage", "state": "set_aside",
                               "message": notice})
        for device in config.devices:
            self._start_device(device)
        await self._start_sync()
        await self._start_sparkplug()
        for model in config.models:
            self._start_model(model)
        self.spawn(self.gate.run(), "safety-gate")
        self._start_optimizer()
        self.spawn(self.writer.run(), "twin-writer")
        self.spawn(self._housekeeping(), "housekeeping")
        if config.metrics.enabled:
            from edge_agent.service import metrics

            self.spawn(metrics.serve(self.status, config.metrics.host, config.metrics.port), "metrics")
        self._start_web()
        await self.write_status()
        if not config.devices:
            log.warning("no devices configured: the agent runs but mirrors nothing")
        log.info("agent %s (site %s) started: %d devices, %d points, twin %s", config.agent.id,
                 config.agent.site, len(config.devices), sum(len(d.points) for d in config.devices),
                 config.twin_path)

    async def _restore_gate(self, twin: Twin) -> None:
        """Give the gate its memory back (last writes, override holds) before the writer uses the twin."""
        assert self.writer is not None
        since = time.time() - self._config.gate.override_hold
        try:
            last_writes, overrides = await asyncio.to_thread(twin.gate_memory, since)
        except TwinError as exc:
            # without the last writes min_interval cannot be honoured: count it from now (the safe side)
            log.error("%s; the safety gate counts min_interval from now", exc)
            now = time.time()
            last_writes, overrides = {name: now for name in self.gate.points}, []
        self.gate.remember(last_writes, overrides, dict(self.writer.latest))

    def _start_device(self, device: DeviceConfig) -> None:
        runner = DeviceRunner(device, self._config.agent.data_dir, self.submit, self.last_value,
                              driver_factory=self._driver_factory, room=self.room, on_event=self.record_event)
        self.runners[device.name] = runner
        self._parts[f"device:{device.name}"] = self.spawn(runner.run(), f"device:{device.name}")

    def _start_model(self, model: ModelConfig) -> None:
        # numpy and onnxruntime are imported only when a model is configured (memory on small gateways)
        from edge_agent.control.inference import ModelRunner

        equipment = model.equipment or (self._owner.get(model.inputs[0]) if model.inputs else None)
        runner = ModelRunner(model, self.last_value, self.submit, self.record_event, equipment,
                             known=dict(self._owner), age=self.data_age)
        self.models[model.name] = runner
        self._parts[f"model:{model.name}"] = self.spawn(runner.run(), f"model:{model.name}")

    def _start_optimizer(self) -> None:
        settings = self._config.optimizer
        if settings is None:
            return
        from edge_agent.control.optimizer import Optimizer

        self.optimizer = Optimizer(settings, self._config, lambda: self.models.get(settings.model), self.last_value,
                                   self.gate, self.record_event)
        self._parts["optimizer"] = self.spawn(self.optimizer.run(), "optimizer")

    async def _start_sync(self) -> None:
        mqtt = self._config.mqtt
        if mqtt is None:
            log.info("no [mqtt] section: running offline only; the twin is kept locally")
            return
        limits = OutboxLimits(max_rows=mqtt.outbox_max_rows, max_bytes=mqtt.outbox_max_bytes)

        def outbox(path: Path) -> Outbox:
            return Outbox.open(path, limits=limits, max_inflight=mqtt.max_inflight, synchronous=mqtt.outbox_sync)

        known = len(self.storage)
        self.outbox = await asyncio.to_thread(self._open_store, self._config.agent.data_dir / "outbox.db", outbox,
                                              "the outbox", "messages are kept in memory only, lost on restart")
        for notice in self.storage[known:]:
            self.record_event({"ts": time.time(), "source": "storage", "kind": "storage", "state": "set_aside",
                               "message": notice})
        on_message = on_desired = None
        if self._config.commands.enabled:
            from edge_agent.remote.dispatch import CommandHandler

            # One handler for the agent's life: its replay store and in-flight commands outlive a
            # restart of the MQTT link (a reload that changes [mqtt] calls this again).
            if self.commands is None:
                self.commands = CommandHandler(self)
            self.commands.attach()
            on_message = self.commands.on_message
            on_desired = self._attach_desired()
        from edge_agent.cloud.sync import Sync  # with its MQTT client (paho): not loaded by an offline gateway

        self.sync = Sync(self._config, self.outbox, self.twin_points, on_message=on_message, on_desired=on_desired)
        self._forward()
        self.sync.start()

    def _forward(self) -> None:
        """Point the twin writer at whatever carries data out now: the JSON sync, the Sparkplug node, both."""
        if self.writer is not None:
            targets = [t for t in (self.sync, self.edge_node) if t is not None]
            self.writer.forward = _Forwards(targets) if targets else None
            self.writer.on_desired = self.sync.twin_changed if self.sync is not None else None

    def _attach_desired(self) -> Callable[[Any], None]:
        """The cloud's desired state (signed like commands): one receiver for the agent's life."""
        from edge_agent.remote.desired import DesiredState

        if self.desired is None:
            self.desired = DesiredState(self)
        self.desired.attach()
        return self.desired.on_message

    def _open_store(self, path: Path, opener: Callable[[Path], T], what: str, in_memory: str) -> T:
        """Open one of the agent's SQLite files (blocking: from a worker thread).

        A file that cannot be used is set aside and a fresh one created; when even that fails (a
        read-only or missing data directory), the part runs on an in-memory database. Either way the
        agent runs on, and the notice goes to the log, an event and status.json ("storage").
        """
        try:
            opened, notice = sqlite.open_or_set_aside(path, opener, what)
        except TwinError as exc:
            notice = f"{what} {path} cannot be used ({exc}); running without it: {in_memory}"
            log.critical("%s", notice)
            opened = opener(Path(":memory:"))
        if notice is not None:
            self.storage.append(notice)
        return opened

    async def _stop_sync(self) -> None:
        """Leave the broker (Will: offline) and close the outbox; what it holds stays on disk."""
        sync, self.sync = self.sync, None
        self._forward()
        if sync is not None:
            await sync.stop()
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
            self.outbox = None

    async def _start_sparkplug(self) -> None:
        """The Sparkplug B edge node: its own outbox file and its own MQTT connection (see cloud/edge_node.py)."""
        config = self._config
        if not config.sparkplug.enabled or config.mqtt is None:
            return
        from edge_agent.cloud.edge_node import EdgeNode

        mqtt = config.mqtt
        limits = OutboxLimits(max_rows=mqtt.outbox_max_rows, max_bytes=mqtt.outbox_max_bytes)
        self.edge_outbox = await asyncio.to_thread(
            Outbox.open, config.agent.data_dir / "sparkplug.db", limits=limits, max_inflight=mqtt.max_inflight,
            synchronous=mqtt.outbox_sync)
        self.edge_node = EdgeNode(config, self.edge_outbox, latest=self.last_value, device_state=self._device_state,
                                  request_write=self._sparkplug_write if config.sparkplug.accept_writes else None)
        self._forward()
        self.edge_node.start()

    async def _stop_sparkplug(self) -> None:
        """Publish NDEATH and leave; what the node's outbox holds stays on disk for the next session."""
        node, self.edge_node = self.edge_node, None
        self._forward()
        if node is not None:
            await node.stop()
        if self.edge_outbox is not None:
            await asyncio.to_thread(self.edge_outbox.close)
            self.edge_outbox = None

    def _device_state(self, name: str) -> str | None:
        runner = self.runners.get(name)
        return runner.status.state if runner is not None else None

    async def _sparkplug_write(self, point: str, value: Any) -> tuple[bool, str]:
        """A DCMD write (sparkplug.accept_writes = true): through the safety gate like every other."""
        result = await self.request_write(point, value, source="sparkplug", actor=None)
        return result.ok, result.result + (f": {result.reason}" if result.reason else "")

    def _start_web(self) -> None:
        web = self._config.web
        if not web.enabled:
            return
        from edge_agent.service.web import WebPage

        page = WebPage(self.status, lambda: self._config, self.current, self.query)
        self._parts["web"] = self.spawn(page.serve(web.host, web.port), "web")

    async def restart_device(self, name: str) -> None:
        """Close a device's connection and start its supervisor afresh (the restart_driver command)."""
        settings = next(d for d in self._config.devices if d.name == name)
        await self._stop_part(f"device:{name}")
        self._start_device(settings)

    async def _stop_part(self, key: str) -> None:
        kind, _, name = key.partition(":")
        if kind == "device" and name in self.runners:
            self.runners[name].stop()  # see DeviceRunner.stop: a cancel alone can be swallowed
        task = self._parts.pop(key, None)
        if task is not None:
            await cancel_all([task])
            self._tasks.remove(task)

    async def stop(self) -> None:
        """Stop polling, flush what is pending, leave the broker, close the outbox and the twin."""
        if self.writer is not None:
            self.writer.release()  # a poller waiting on back-pressure must see its cancellation
        for runner in self.runners.values():
            runner.stop()
        await cancel_all(self._tasks)
        self._tasks.clear()
        self._parts.clear()
        # Runners closed their drivers on cancellation; store what they delivered, with the
        # sync still attached so the cloud gets it too.
        if self.writer is not None:
            await self.writer.flush(final=True)
            await self.writer.store_records()
        await self._stop_sparkplug()
        await self._stop_sync()
        await asyncio.to_thread(self._reader.close)
        if self.writer is not None:
            await self.writer.close()
            log.info("agent stopped; %d history rows stored this run", self.writer.stored)
        logging.getLogger().removeHandler(self._recorder)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, wait for ``stop``, then stop cleanly."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # ------------------------------------------------------------------ reload

    def needs_restart(self, new: AgentConfig) -> bool:
        """Whether ``new`` changes settings only a restart of the agent can apply (agent.*, twin.*)."""
        return (new.agent, new.twin) != (self._config.agent, self._config.twin)

    async def reload(self, new: AgentConfig) -> str:
        """Apply a new config to the running agent without losing buffered data; returns what changed.

        Devices and models whose settings changed are restarted, new ones started, removed ones
        stopped; the MQTT link is restarted only when ``[mqtt]`` changed. A change of ``agent.*``
        or ``twin.*`` needs a restart of the agent (the caller does that: see ``needs_restart``).
        """
        old, self._config = self._config, new
        self._owner = {point.name: device.name for device, point in new.points()}
        self.gate.update(new)
        assert self.writer is not None
        await self.writer.flush()
        await self.writer.sync_points(new)
        changes: list[str] = []
        changes += await self._reconcile("device", {d.name: d for d in old.devices}, {d.name: d for d in new.devices},
                                         self.runners, self._start_device)
        changes += await self._reconcile("model", {m.name: m for m in old.models}, {m.name: m for m in new.models},
                                         self.models, self._start_model)
        if old.mqtt != new.mqtt:
            await self._stop_sync()
            await self._start_sync()
            changes.append("mqtt restarted")
        if (old.mqtt, old.sparkplug, old.devices) != (new.mqtt, new.sparkplug, new.devices):
            await self._stop_sparkplug()
            await self._start_sparkplug()
            if old.sparkplug.enabled or new.sparkplug.enabled:
                changes.append("sparkplug restarted")
        if old.web != new.web and (old.web.enabled or new.web.enabled):
            await self._stop_part("web")
            self._start_web()
            changes.append("web restarted")
        if old.optimizer != new.optimizer or any(c.startswith("model") for c in changes):
            await self._stop_part("optimizer")
            self.optimizer = None
            self._start_optimizer()
            changes.append("optimizer restarted")
        summary = ", ".join(changes) or "nothing to change"
        log.info("config reloaded from %s: %s", new.source, summary)
        return summary

    async def _reconcile(self, kind: str, old: dict[str, Any], new: dict[str, Any], runners: dict[str, Any],
                         start: Callable[[Any], None]) -> list[str]:
        changes = []
        for name in sorted(old.keys() - new.keys()):
            await self._stop_part(f"{kind}:{name}")
            runners.pop(name, None)
            changes.append(f"{kind} {name} removed")
        for name, settings in new.items():
            if name in old and old[name] == settings:
                continue
            if name in old:
                await self._stop_part(f"{kind}:{name}")
            start(settings)
            changes.append(f"{kind} {name} {'restarted' if name in old else 'added'}")
        return changes

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        period = min([0.5, *(d.interval for d in self._config.devices)])
        next_prune = time.monotonic() + 10.0
        next_status = 0.0
        while True:
            await asyncio.sleep(period)
            now = time.time()
            for runner in self.runners.values():
                runner.watch(now)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + STATUS_INTERVAL
                await self.write_status()
            if time.monotonic() >= next_prune and self.writer is not None:
                next_prune = time.monotonic() + self._config.twin.prune_interval
                await self.writer.prune(now - self._config.twin.history_retention)
                await self.writer.prune(now - self._config.twin.events_retention, table="events")
                await self.writer.prune(now - self._config.twin.writes_retention, table="writes")

    async def write_status(self) -> None:
        """Refresh data_dir/status.json for `edge-agent status`."""
        snapshot = self.status().to_json()
        try:
            await asyncio.to_thread(status_file.write, self._config.agent.data_dir / status_file.STATUS_FILE, snapshot)
        except OSError as exc:  # a full disk: say it once, not every five seconds
            log.log(logging.DEBUG if self._status_failing else logging.WARNING, "cannot write the status file: %s", exc)
            self._status_failing = True
        else:
            if self._status_failing:
                log.info("status file written again")
            self._status_failing = False


def _model_state(name: str, runner: ModelRunner) -> ModelState:
    s = runner.status
    return ModelState(name, runner.cfg.kind, s.state, s.last_score, s.last_ts, s.evaluations, sum(s.skips.values()),
                      s.last_skip, runner.anomaly_active, s.last_error,
                      runner.model.source if runner.model else None, s.cpu_us)


class _Forwards:
    """The twin writer's one forward, fanned out to each part that carries data out."""

    def __init__(self, targets: list[Any]) -> None:
        self.targets = targets

    def prepare(self, readings: Sequence[Reading]) -> list[Any]:
        return [target.prepare(readings) for target in self.targets]

    def add(self, readings: Sequence[Reading], prepared: list[Any] | None = None) -> None:
        for index, target in enumerate(self.targets):
            target.add(readings, prepared[index] if prepared is not None else None)

    async def append_event(self, kind: str, fields: dict[str, Any]) -> None:
        for target in self.targets:
            await target.append_event(kind, fields)


def _task_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("task %s died: %r", task.get_name(), task.exception(), exc_info=task.exception())
