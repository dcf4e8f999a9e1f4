"""The supervisor: one task per device, the twin writer, and housekeeping; owns shutdown.

Data path: drivers -> ``Agent.submit`` (an in-memory list of chunks, bounded) -> the
writer task, which every ``twin.flush_interval`` (or sooner, when ``twin.flush_max``
readings are waiting) stores everything pending in one SQLite transaction off the event
loop. The agent also keeps the latest Reading of every point in memory for the parts that
need current values fast (models, the safety gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.base import Driver, Reading
from edge_agent.cloud.sync import Sync
from edge_agent.config import AgentConfig, DeviceConfig, ModelConfig
from edge_agent.control.gate import SafetyGate, WriteResult
from edge_agent.device import DeviceRunner
from edge_agent.errors import TwinError
from edge_agent.service import status as health
from edge_agent.service.logs import RecentErrors
from edge_agent.store.outbox import Outbox, OutboxLimits
from edge_agent.store.twin import Chunk, Twin
from edge_agent.tasks import cancel_all, finish_in_thread

if TYPE_CHECKING:
    from edge_agent.control.inference import ModelRunner
    from edge_agent.control.optimizer import Optimizer

log = logging.getLogger(__name__)
STATUS_INTERVAL = 5.0  # seconds between refreshes of data_dir/status.json


DriverFactory = Callable[[DeviceConfig, Path], Driver]


class Agent:
    """Runs the gateway for one validated config until ``stop`` is set."""

    def __init__(self, config: AgentConfig, *, driver_factory: DriverFactory | None = None) -> None:
        self.config = config
        self.started = time.time()
        self.twin: Twin | None = None
        self.outbox: Outbox | None = None
        self.sync: Sync | None = None
        self.latest: dict[str, Reading] = {}
        self.runners: dict[str, DeviceRunner] = {}
        self.models: dict[str, ModelRunner] = {}
        self._owner = {point.name: device.name for device, point in config.points()}
        self.gate = SafetyGate(config, self.last_value, self._driver_for, self.anomaly_active, self._record_write,
                               self.submit, on_rollback=self._on_rollback, age=self.data_age)
        self.optimizer: Optimizer | None = None
        self.stored = 0  # history rows written since start
        self.received = 0  # readings received from devices and models since start
        self.flush_seconds = 0.0  # wall time spent in twin flushes (for the average write latency)
        self.last_flush_seconds = 0.0
        self.flushes = 0
        self.flush_errors = 0
        self._driver_factory = driver_factory
        self._pending: list[Chunk] = []
        self._records: list[tuple[str, dict[str, Any]]] = []  # ("event" | "write", record), to store
        self._pending_count = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()  # set while the pending readings are under the high-water mark
        self._room.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._parts: dict[str, asyncio.Task[None]] = {}  # "device:NAME" / "model:NAME" -> its task
        self._flush_lock = asyncio.Lock()
        self._points_synced = 0.0
        self.recent_errors: deque[str] = deque(maxlen=10)
        self._recorder = RecentErrors(self.recent_errors)

    @property
    def pending_count(self) -> int:
        """Readings received and not yet stored in the twin."""
        return self._pending_count

    # ------------------------------------------------------------------ data path

    def submit(self, readings: Sequence[Reading]) -> None:
        """Accept readings from a device (called on the event loop); stored at the next flush."""
        if not readings:
            return
        self._pending.append((time.time(), readings))
        latest = self.latest
        for r in readings:
            latest[r[0]] = r
        self._pending_count += len(readings)
        self.received += len(readings)
        if self._pending_count >= self.config.twin.flush_max:
            self._wake.set()
            if self._pending_count >= 4 * self.config.twin.flush_max:
                self._room.clear()

    async def room(self) -> None:
        """Wait while the twin is behind: pollers pause here so memory stays bounded (back-pressure)."""
        await self._room.wait()

    def record_event(self, event: dict[str, Any]) -> None:
        """Accept an event (anomaly, device outage, ...); stored and published at the next flush."""
        self._records.append(("event", event))
        self._wake.set()

    async def _store_records(self) -> None:
        """Store pending events and write records in the twin, then queue them for the cloud."""
        records, self._records = self._records, []
        if not records or self.twin is None:
            return
        for kind, record in records:
            store = self.twin.record_write if kind == "write" else self.twin.add_event
            try:
                record["id"] = await finish_in_thread(store, record)
            except TwinError as exc:
                log.error("%s; %s kept in memory for the next attempt", exc, kind)
                self._records.append((kind, record))
                continue
            if self.sync is not None:
                event_type = "write" if kind == "write" else str(record["kind"])
                fields = {k: v for k, v in record.items() if k != "kind"}
                try:
                    await self.sync.append([self.sync.event(event_type, fields)])
                except TwinError as exc:
                    log.error("%s; %s %s is in the twin but not queued for the cloud", exc, kind, record["id"])

    def _driver_for(self, device: str) -> Driver | None:
        runner = self.runners.get(device)
        return runner.driver if runner is not None and runner.status.state == "up" else None

    def _record_write(self, result: WriteResult) -> None:
        record = result.record()
        record["configured"] = result.point in self.gate.points  # no desired state for unknown points
        self._records.append(("write", record))
        self._wake.set()

    def _on_rollback(self, reason: str) -> None:
        if self.optimizer is not None:
            self.optimizer.set_mode("advise", reason=f"rollback: {reason}")
        self.record_event({"ts": time.time(), "source": "gate", "kind": "rollback", "state": "raised",
                           "message": reason})

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

    def snapshot(self) -> list[dict[str, Any]]:
        """Every configured point's latest value, quality, source time and unit (from memory)."""
        rows = []
        for name, _, unit in self.config.all_points():
            r = self.latest.get(name)
            rows.append({"name": name, "value": r.value if r else None, "quality": r.quality if r else "bad",
                         "ts": r.ts if r else None, "unit": unit})
        return rows

    async def flush(self, *, final: bool = False) -> int:
        """Store every pending reading in one transaction, off the event loop.

        Shielded as a whole: a cancelled caller (stop() cancelling the writer) still lets the
        batch be committed *and* handed to the cloud sync, never one without the other.
        """
        inner = asyncio.ensure_future(self._flush(final=final))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            await asyncio.wait([inner])
            raise

    async def _flush(self, *, final: bool = False) -> int:
        async with self._flush_lock:
            if self.twin is None or not (self._pending or (final and self.twin.has_unsynced)):
                return 0
            # the points table (current values) is refreshed at most every points_interval: one
            # UPDATE per point per refresh instead of per flush (history gets every reading)
            now = time.monotonic()
            update = final or now - self._points_synced >= self.config.twin.points_interval
            chunks, self._pending, self._pending_count = self._pending, [], 0
            self._room.set()
            try:
                began = time.perf_counter()
                kept = await asyncio.to_thread(self.twin.write_batch, chunks, update_points=update)
                if update:
                    self._points_synced = now
                self.last_flush_seconds = time.perf_counter() - began
                self.flush_seconds += self.last_flush_seconds
            except TwinError as exc:
                # Keep the readings and try again at the next flush; a full disk or a locked
                # file must not lose data that is still in memory.
                self.flush_errors += 1
                log.error("%s; %d readings kept in memory for the next attempt", exc,
                          sum(len(c[1]) for c in chunks))
                self._pending[:0] = chunks
                self._pending_count += sum(len(c[1]) for c in chunks)
                return 0
            self.stored += len(kept)
            self.flushes += 1
            if self.sync is not None:
                self.sync.add(kept)
            return len(kept)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the twin and start every task; returns once they are running."""
        config = self.config
        self.twin = await asyncio.to_thread(Twin.open, config.twin_path)
        await asyncio.to_thread(self.twin.sync_points, config)
        for row in await asyncio.to_thread(self.twin.current):
            if row["ts"] is not None:
                self.latest[row["name"]] = Reading(row["name"], row["value"], row["quality"], row["ts"])
        logging.getLogger().addHandler(self._recorder)
        for device in config.devices:
            self._start_device(device)
        await self._start_sync()
        for model in config.models:
            self._start_model(model)
        self._spawn(self.gate.run(), "safety-gate")
        self._start_optimizer()
        self._spawn(self._writer(), "twin-writer")
        self._spawn(self._housekeeping(), "housekeeping")
        if config.metrics.enabled:
            from edge_agent.service import metrics

            self._spawn(metrics.serve(self, config.metrics.host, config.metrics.port), "metrics")
        await self.write_status()
        if not config.devices:
            log.warning("no devices configured: the agent runs but mirrors nothing")
        log.info("agent %s (site %s) started: %d devices, %d points, twin %s", config.agent.id,
                 config.agent.site, len(config.devices), sum(len(d.points) for d in config.devices),
                 config.twin_path)

    def _start_device(self, device: DeviceConfig) -> None:
        runner = DeviceRunner(device, self.config.agent.data_dir, self.submit, self.last_value,
                              driver_factory=self._driver_factory, room=self.room, on_event=self.record_event)
        self.runners[device.name] = runner
        self._parts[f"device:{device.name}"] = self._spawn(runner.run(), f"device:{device.name}")

    def _start_model(self, model: ModelConfig) -> None:
        # numpy and onnxruntime are imported only when a model is configured (memory on small gateways)
        from edge_agent.control.inference import ModelRunner

        owner = {point.name: device.name for device, point in self.config.points()}
        equipment = model.equipment or (owner.get(model.inputs[0]) if model.inputs else None)
        runner = ModelRunner(model, self.last_value, self.submit, self.record_event, equipment, known=owner,
                             age=self.data_age)
        self.models[model.name] = runner
        self._parts[f"model:{model.name}"] = self._spawn(runner.run(), f"model:{model.name}")

    async def restart_device(self, name: str) -> None:
        """Close a device's connection and start its supervisor afresh (the restart_driver command)."""
        settings = next(d for d in self.config.devices if d.name == name)
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

    async def reload(self, new: AgentConfig) -> str:
        """Apply a new config to the running agent without losing buffered data; returns what changed.

        Devices and models whose settings changed are restarted, new ones started, removed ones
        stopped; the MQTT link is restarted only when ``[mqtt]`` changed. A change of ``agent.*``
        or ``twin.*`` needs a restart of the agent (the caller does that: see ``needs_restart``).
        """
        old, self.config = self.config, new
        self._owner = {point.name: device.name for device, point in new.points()}
        self.gate.update(new)
        await self.flush()
        assert self.twin is not None
        await finish_in_thread(self.twin.sync_points, new)
        changes: list[str] = []
        changes += await self._reconcile("device", {d.name: d for d in old.devices}, {d.name: d for d in new.devices},
                                         self.runners, self._start_device)
        changes += await self._reconcile("model", {m.name: m for m in old.models}, {m.name: m for m in new.models},
                                         self.models, self._start_model)
        if old.mqtt != new.mqtt:
            await self._stop_sync()
            await self._start_sync()
            changes.append("mqtt restarted")
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

    def _start_optimizer(self) -> None:
        settings = self.config.optimizer
        if settings is None:
            return
        from edge_agent.control.optimizer import Optimizer

        self.optimizer = Optimizer(settings, self.config, lambda: self.models.get(settings.model), self.last_value,
                                   self.gate, self.record_event)
        self._parts["optimizer"] = self._spawn(self.optimizer.run(), "optimizer")

    def anomaly_active(self, equipment: str) -> list[str]:
        """Names of the models with an active anomaly on this equipment (device)."""
        return [name for name, runner in self.models.items()
                if runner.anomaly_active and runner.equipment == equipment]

    async def _start_sync(self) -> None:
        mqtt = self.config.mqtt
        if mqtt is None:
            log.info("no [mqtt] section: running offline only; the twin is kept locally")
            return
        limits = OutboxLimits(max_rows=mqtt.outbox_max_rows, max_bytes=mqtt.outbox_max_bytes)
        self.outbox = await asyncio.to_thread(
            Outbox.open, self.config.agent.data_dir / "outbox.db", limits=limits, max_inflight=mqtt.max_inflight,
            synchronous=mqtt.outbox_sync)
        on_message = None
        if self.config.commands.enabled:
            from edge_agent.remote.dispatch import CommandHandler

            # One handler for the agent's life: its replay store and in-flight commands outlive a
            # restart of the MQTT link (a reload that changes [mqtt] calls this again).
            self.commands: CommandHandler | None = getattr(self, "commands", None) or CommandHandler(self)
            self.commands.attach()
            on_message = self.commands.on_message
        self.sync = Sync(self.config, self.outbox, self.snapshot, on_message=on_message)
        self.sync.start()

    async def _stop_sync(self) -> None:
        """Leave the broker (Will: offline) and close the outbox; what it holds stays on disk."""
        if self.sync is not None:
            await self.sync.stop()
            self.sync = None
        if self.outbox is not None:
            await asyncio.to_thread(self.outbox.close)
            self.outbox = None

    async def stop(self) -> None:
        """Stop polling, flush what is pending, leave the broker, close the outbox and the twin."""
        self._room.set()  # a poller waiting on back-pressure must see its cancellation
        for runner in self.runners.values():
            runner.stop()
        await cancel_all(self._tasks)
        self._tasks.clear()
        self._parts.clear()
        # Runners closed their drivers on cancellation; store what they delivered.
        await self.flush(final=True)
        await self._store_records()
        await self._stop_sync()
        if self.twin is not None:
            await asyncio.to_thread(self.twin.close)
            self.twin = None
        logging.getLogger().removeHandler(self._recorder)
        log.info("agent stopped; %d history rows stored this run", self.stored)

    def needs_restart(self, new: AgentConfig) -> bool:
        """Whether ``new`` changes settings only a restart of the agent can apply (agent.*, twin.*)."""
        return (new.agent, new.twin) != (self.config.agent, self.config.twin)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, wait for ``stop``, then stop cleanly."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    @staticmethod
    def _task_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("task %s died: %r", task.get_name(), task.exception(), exc_info=task.exception())

    # ------------------------------------------------------------------ tasks

    async def _writer(self) -> None:
        interval = self.config.twin.flush_interval
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (gh-86296)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()
            await self._store_records()

    async def _housekeeping(self) -> None:
        twin_cfg = self.config.twin
        period = min([0.5, *(d.interval for d in self.config.devices)])
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
            if time.monotonic() >= next_prune and self.twin is not None:
                next_prune = time.monotonic() + twin_cfg.prune_interval
                await self._prune(now - twin_cfg.history_retention)

    async def write_status(self) -> None:
        """Refresh data_dir/status.json for `edge-agent status`."""
        status = health.snapshot(self)
        try:
            await asyncio.to_thread(health.write, self.config.agent.data_dir / health.STATUS_FILE, status)
        except OSError as exc:
            log.warning("cannot write the status file: %s", exc)

    async def _prune(self, before: float) -> None:
        assert self.twin is not None
        async with self._flush_lock:
            try:
                removed = await finish_in_thread(self.twin.prune, before)
            except TwinError as exc:
                log.error("%s", exc)
                return
        if removed:
            log.info("twin: pruned %d history rows older than retention", removed)
