"""The Sparkplug B 3.0 edge node: the gateway as Ignition, HiveMQ or any Sparkplug host application sees it.

Each configured device is a Sparkplug device, each of its points a metric named as the point is
(``pump1.flow``). Group id and edge node id default to ``agent.site`` and ``agent.id``.

Connection. The node has an MQTT connection of its own to the ``[mqtt]`` broker (client id
``sparkplug.client_id``, default ``{mqtt.client_id}-sparkplug``): an MQTT connection has one Will,
and the JSON side's Will (``state`` "offline", retained) and the node's (NDEATH, not retained) must
both be there. Before every CONNECT the node takes the next ``bdSeq`` (0..255, kept in
``data_dir/sparkplug.json`` so it keeps counting across restarts) and registers the NDEATH with it
as the Will, which the broker publishes if the agent dies.

Messages. Everything goes through an outbox of its own (``data_dir/sparkplug.db``, the same
:class:`~edge_agent.store.outbox.Outbox` as the JSON side, same bounds): data as ``telemetry``
rows (the oldest dropped first when it is full), births and deaths as ``event`` rows. A session
(after CONNECT, and after a primary host's STATE online when ``sparkplug.primary_host`` is set)
starts with NBIRTH (bdSeq, Node Control/Rebirth) and one DBIRTH per device with every point's
current value, then a DDEATH for each device that is down. After that, every
``mqtt.publish_interval`` the values that changed go out as one DDATA per device; a device that
goes down gets a DDEATH (and no DATA), one that comes back a DBIRTH.

``seq`` is stamped when a message is published: 0 on NBIRTH, then one more per message, 255 -> 0.
Messages stored before the session's NBIRTH (buffered offline, or queued when a rebirth was asked
for) are the backlog: after the births its DDATA are replayed with ``is_historical = true``, paced
at ``mqtt.replay_rate`` samples per second while live data goes first; births and deaths of older
sessions are dropped unsent. An NCMD ``Node Control/Rebirth = true`` stops the data and publishes
the births again (same bdSeq). A clean stop publishes NDEATH, then leaves (MQTT 5: DISCONNECT with
reason 0x04, so the broker sends the Will too; 3.1.1: without DISCONNECT, the same effect).

Writes. DCMD metrics are refused (logged) unless ``sparkplug.accept_writes = true``; then each
goes to the ``request_write`` callback the agent passes in, which is the safety gate with source
``sparkplug``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from drivers.base import Reading
from edge_agent.cloud import sparkplug as spb
from edge_agent.cloud.link import MqttLink
from edge_agent.config import AgentConfig, PointConfig
from edge_agent.errors import LinkError, TwinError
from edge_agent.pacing import TokenBucket
from edge_agent.store.messages import Draft, Message
from edge_agent.store.outbox import Outbox
from edge_agent.tasks import wait_event

log = logging.getLogger(__name__)

WriteRequest = Callable[[str, Any], Awaitable[tuple[bool, str]]]  # (point, value) -> (applied, the gate's verdict)
STATE_FILE = "sparkplug.json"
STOP_GRACE = 2.0  # seconds a clean stop waits for its last data and the NDEATH to be delivered
WRITE_QUEUE = 100  # DCMD metrics waiting for the safety gate; more are refused
RETYPE_EVERY = 10.0  # seconds: at most one rebirth this often because a value changed its kind


class EdgeNode:
    """One Sparkplug edge node session after another, for as long as :meth:`start` .. :meth:`stop`."""

    def __init__(self, config: AgentConfig, outbox: Outbox, *, latest: Callable[[str], Reading | None],
                 device_state: Callable[[str], str | None],
                 request_write: WriteRequest | None = None) -> None:
        assert config.mqtt is not None
        self.cfg, self.settings = config.mqtt, config.sparkplug
        self.outbox = outbox
        self.latest = latest
        self.device_state = device_state
        self.request_write = request_write  # the safety gate, source "sparkplug"
        self.topics = spb.SparkplugTopics(self.settings.group_id, self.settings.edge_node_id)
        self.devices: dict[str, tuple[PointConfig, ...]] = {d.name: tuple(d.points) for d in config.devices}
        self.owner = {p.name: d for d, points in self.devices.items() for p in points}
        self.state_path = config.agent.data_dir / STATE_FILE
        subscriptions = [self.topics.ncmd, self.topics.dcmd_filter]
        if self.settings.primary_host:
            subscriptions.append(spb.SparkplugTopics.state(self.settings.primary_host))
        self.link = MqttLink(self.cfg, will_topic=self.topics.ndeath, will_payload=self._next_will, will_retain=False,
                             client_id=self.settings.client_id, subscriptions=tuple(subscriptions),
                             on_message=self._on_message, name="sparkplug")
        self.link.on_ack = self._on_ack
        self.link.on_up = self._wake_up
        self.bucket = TokenBucket(self.cfg.replay_rate, max(self.cfg.replay_rate, self.cfg.max_samples))
        self.bd_seq: int | None = None
        self.born = False  # NBIRTH appended in this MQTT session
        self.published = 0
        self.acked = 0
        self.births = 0
        self._seq = 0
        self._samples: list[Reading] = []
        self._datatypes: dict[str, int] = {}
        self._sent: dict[str, tuple[Any, str]] = {}  # point -> (value, quality) last reported
        self._alive: dict[str, bool] = {}  # device -> announced alive (DBIRTH) in this session
        self._rebirth = False
        self._retyped = -RETYPE_EVERY
        self._host_online = asyncio.Event()
        self._host_ts = -1
        self._leave = False  # the primary host went offline: end the session
        self._mids: dict[int, int] = {}
        self._acks: list[int] = []
        self._wake = asyncio.Event()
        self._compose = asyncio.Lock()  # births and batches are built and stored one at a time
        self._live = 0  # live cursor: every id up to here was published or moved to the backlog
        self._backlog: list[tuple[int, int]] = []  # (after, upto) id ranges to replay as historical
        self._births_upto = 0  # the last birth id of the session; no backlog before it is out
        self._writes: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue(maxsize=WRITE_QUEUE)
        self._refusals = 0
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ input (the twin writer's forward)

    def prepare(self, readings: Sequence[Reading]) -> None:
        """Nothing to make ahead: DDATA is encoded at the publish interval."""

    def add(self, readings: Sequence[Reading], prepared: object = None) -> None:
        """Readings the twin kept; the changed ones go out as DDATA at the next publish interval."""
        self._samples.extend(r for r in readings if r[0] in self.owner)

    async def append_event(self, kind: str, fields: dict[str, Any]) -> None:
        """Events stay on the JSON topics; a device's death and birth are read from its state instead."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for coro, name in ((self.link.run(), "sparkplug-link"), (self._batcher(), "sparkplug-batcher"),
                           (self._drain(), "sparkplug-drain"), (self._writer(), "sparkplug-writes")):
            self._tasks.append(asyncio.create_task(coro, name=name))
        log.info("sparkplug: edge node %s/%s with %d devices, DCMD writes %s", self.settings.group_id,
                 self.settings.edge_node_id, len(self.devices),
                 "through the safety gate" if self.settings.accept_writes else "refused")

    async def stop(self) -> None:
        """Store what is gathered, deliver it and an NDEATH while online (at most ``STOP_GRACE`` s), leave."""
        with contextlib.suppress(TwinError):
            await self._batch()
            if self.born and self.link.connected.is_set():
                await self._deliver(STOP_GRACE / 2)
                await self._append([Draft("event", self.topics.ndeath, spb.ndeath(self.bd_seq or 0))])
                await self._deliver(STOP_GRACE / 2)
        drain = [t for t in self._tasks if t.get_name() == "sparkplug-drain"]
        for task in drain:
            task.cancel()
        await _settle(drain)
        with contextlib.suppress(TwinError):
            await self._ack_pending()
        await self.link.close()
        for task in self._tasks:
            task.cancel()
        await _settle(self._tasks)
        self._tasks.clear()

    async def _deliver(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self.link.connected.is_set() and time.monotonic() < deadline:
            if await asyncio.to_thread(lambda: self.outbox.stats().depth) == 0:
                return
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ bdSeq and the Will

    async def _next_will(self) -> bytes:
        """Before every CONNECT: the next bdSeq (mod 256), stored first, and the NDEATH that carries it."""
        previous = await asyncio.to_thread(_read_bd_seq, self.state_path)
        bd_seq = 0 if previous is None else (previous + 1) % 256
        await asyncio.to_thread(_write_bd_seq, self.state_path, bd_seq)
        self.bd_seq = bd_seq
        return spb.ndeath(bd_seq)

    # ------------------------------------------------------------------ composing births and data

    def _sample(self, point: PointConfig, reading: Reading | None, now: float) -> spb.Sample:
        value = reading.value if reading is not None else None
        known = self._datatypes.get(point.name)
        datatype = known if known is not None and spb.fits(known, value) else spb.datatype_for(point, value)
        if not spb.fits(datatype, value):  # the device sends another kind than its config says: believe the value
            datatype = spb.datatype_of(value)
        self._datatypes[point.name] = datatype
        return spb.Sample(point.name, datatype, value, reading.quality if reading is not None else "bad",
                          reading.ts if reading is not None else now)

    def _device_birth(self, device: str, now: float) -> Draft:
        samples = [self._sample(p, self.latest(p.name), now) for p in self.devices[device]]
        for s in samples:
            self._sent[s.name] = (s.value, s.quality)
        self._alive[device] = True
        return Draft("event", self.topics.device("DBIRTH", device), spb.dbirth(samples))

    def _device_death(self, device: str) -> Draft:
        self._alive[device] = False
        return Draft("event", self.topics.device("DDEATH", device), spb.ddeath())

    async def _birth(self) -> None:
        """Store a whole birth sequence; everything stored before it and not yet published becomes backlog."""
        async with self._compose:
            now = time.time()
            self._rebirth = False
            self._samples.clear()  # the births carry the current values
            drafts = [Draft("event", self.topics.nbirth, spb.nbirth(self.bd_seq or 0))]
            drafts += [self._device_birth(device, now) for device in self.devices]
            drafts += [self._device_death(d) for d in self.devices if self.device_state(d) == "down"]
            appended = await asyncio.to_thread(self.outbox.append, drafts)
        first, last = appended[0].id, appended[-1].id
        assert first is not None and last is not None  # events are never refused
        if first - 1 > self._live:
            self._backlog.append((self._live, first - 1))
        self._live, self._births_upto = first - 1, last
        self.born = True
        self.births += 1
        log.info("sparkplug: NBIRTH (bdSeq %s) and %d DBIRTH queued", self.bd_seq, len(self.devices))
        self._wake.set()

    async def _batcher(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.publish_interval)
            try:
                await self._batch()
            except TwinError as exc:
                log.error("%s; samples kept in memory for the next attempt", exc)

    async def _batch(self) -> None:
        async with self._compose:
            samples, self._samples = self._samples, []
            drafts, rebirth = self._data_drafts(samples)
            try:
                await self._append(drafts)
            except TwinError:
                self._samples[:0] = samples
                raise
        if rebirth and self.born:
            self._rebirth = True
            self._wake.set()

    def _data_drafts(self, samples: list[Reading]) -> tuple[list[Draft], bool]:
        """DDATA of the values that changed, one per device (and deaths and births while in a session).

        Returns the drafts and whether a value no longer fits its metric's datatype (then the node is
        born again, with the new datatype).
        """
        by_device: dict[str, list[spb.Sample]] = {}
        rebirth = False
        for r in samples:
            if self._sent.get(r[0]) == (r[1], r[2]):
                continue  # report by exception
            datatype = self._datatypes.get(r[0])
            if datatype is not None and not spb.fits(datatype, r[1]) and self.born:
                # the next births carry it, with the datatype it has now (at most every RETYPE_EVERY s:
                # a point flapping between kinds must not keep the node in births)
                if time.monotonic() - self._retyped >= RETYPE_EVERY:
                    self._retyped, rebirth = time.monotonic(), True
                    log.info("sparkplug: %s no longer fits its datatype (value %r): rebirth", r[0], r[1])
                continue
            if datatype is None or not spb.fits(datatype, r[1]):
                datatype = spb.datatype_of(r[1])
            self._sent[r[0]] = (r[1], r[2])
            by_device.setdefault(self.owner[r[0]], []).append(spb.Sample(r[0], datatype, r[1], r[2], r[3]))
        drafts: list[Draft] = []
        now = time.time()
        for device in self.devices:
            alive = self.device_state(device) != "down"
            announced = self._alive.get(device, True)
            if self.born and announced and not alive:
                drafts += self._ddata(device, by_device.pop(device, []))
                drafts.append(self._device_death(device))
            elif self.born and alive and not announced:
                drafts.append(self._device_birth(device, now))
            elif not self.born or alive:
                drafts += self._ddata(device, by_device.pop(device, []))
        return drafts, rebirth

    def _ddata(self, device: str, samples: list[spb.Sample]) -> list[Draft]:
        size = self.cfg.max_samples
        return [Draft("telemetry", self.topics.device("DDATA", device), spb.ddata(samples[i:i + size]),
                      samples=len(samples[i:i + size])) for i in range(0, len(samples), size)]

    async def _append(self, drafts: list[Draft]) -> None:
        if drafts:
            await asyncio.to_thread(self.outbox.append, drafts)
            self._wake.set()

    # ------------------------------------------------------------------ draining

    def _wake_up(self) -> None:
        self._wake.set()

    def _on_ack(self, mid: int) -> None:
        outbox_id = self._mids.pop(mid, None)
        if outbox_id is not None:
            self._acks.append(outbox_id)
            self.acked += 1
            self._wake.set()

    async def _ack_pending(self) -> None:
        if self._acks:
            ids, self._acks = self._acks, []
            await asyncio.to_thread(self.outbox.ack, ids)

    async def _drain(self) -> None:
        while True:
            await self.link.connected.wait()
            try:
                await self._session()
            except LinkError as exc:
                log.debug("sparkplug: drain interrupted: %s", exc)
            except TwinError as exc:
                log.error("%s; retrying", exc)
                await asyncio.sleep(1.0)
            finally:
                self.born = False

    async def _session(self) -> None:
        """One MQTT session: wait for the primary host if there is one, births, then data."""
        await self._ack_pending()
        await asyncio.to_thread(self.outbox.requeue)
        self._mids.clear()
        self.born, self._rebirth, self._leave = False, False, False
        self._live = await asyncio.to_thread(self.outbox.last_id)
        self._backlog = [(0, self._live)] if self._live else []
        self._alive.clear()
        if self.settings.primary_host:
            while not self._host_online.is_set():
                if not self.link.connected.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._host_online.wait()
        await self._birth()
        while self.link.connected.is_set():
            self._wake.clear()
            await self._ack_pending()
            if self._leave:
                await self._end_session("the primary host application went offline")
                return
            if self._rebirth:
                self._rebirth = False
                await self._birth()
            live = await asyncio.to_thread(self.outbox.take_range, self._live, None, self.cfg.max_inflight)
            self._live = await self._publish(live, self._live, historical=False)
            delay = 1.0
            if self._backlog and self._live >= self._births_upto:
                delay = await self._replay()
            await wait_event(self._wake, delay)

    async def _end_session(self, why: str) -> None:
        """Publish NDEATH and disconnect (the spec's intentional disconnect); the link connects again."""
        log.warning("sparkplug: %s: publishing NDEATH and disconnecting", why)
        await self._append([Draft("event", self.topics.ndeath, spb.ndeath(self.bd_seq or 0))])
        live = await asyncio.to_thread(self.outbox.take_range, self._live, None, self.cfg.max_inflight)
        self._live = await self._publish(live, self._live, historical=False)
        deadline = time.monotonic() + STOP_GRACE
        while self._mids and self.link.connected.is_set() and time.monotonic() < deadline:
            self._wake.clear()  # an acknowledgement sets it
            await wait_event(self._wake, 0.1)
        await self._ack_pending()
        self.born = False
        await self.link.close()

    async def _replay(self) -> float:
        """Send backlog DDATA the token bucket allows, as historical; returns how long to wait."""
        after, upto = self._backlog[0]
        wait = self.bucket.wait_time(self.cfg.max_samples)
        if wait > 0:
            return min(wait, 1.0)
        affordable = max(1, min(self.cfg.max_inflight, int(self.bucket.tokens // self.cfg.max_samples)))
        batch = await asyncio.to_thread(self.outbox.take_range, after, upto, affordable)
        if not batch:
            if self.outbox.inflight < self.cfg.max_inflight:
                self._backlog.pop(0)
                if not self._backlog:
                    log.info("sparkplug: backlog replayed")
            return 1.0
        allowed = []
        for message in batch:
            if not self.bucket.try_take(max(1, message.samples)):
                break
            allowed.append(message)
        held = batch[len(allowed):]
        if held:
            await asyncio.to_thread(self.outbox.release, [m.id for m in held])
        self._backlog[0] = (await self._publish(allowed, after, historical=True), upto)
        return 0.0 if not held else max(0.0, min(self.bucket.wait_time(max(1, held[0].samples)), 1.0))

    async def _publish(self, messages: list[Message], cursor: int, *, historical: bool) -> int:
        """Publish in order, stamping seq; births and deaths of an older session are dropped unsent."""
        stale = []
        for message in messages:
            cursor = message.id
            kind = spb.verb(message.topic)
            if historical and kind != "DDATA":
                stale.append(message.id)
                continue
            payload = message.payload
            if kind != "NDEATH":
                if kind == "NBIRTH":
                    self._seq = 0
                payload = spb.with_seq(spb.as_historical(payload) if historical else payload, self._seq)
                self._seq = (self._seq + 1) % 256
            # QoS 0 and not retained, as the spec wants for every edge node message; NDEATH QoS 1 like the Will
            qos = 1 if kind == "NDEATH" else 0
            mid = self.link.publish(message.topic, payload, qos=qos, retain=False)
            self._mids[mid] = message.id
            self.published += 1
        if stale:
            await asyncio.to_thread(self.outbox.ack, stale)
        return cursor

    # ------------------------------------------------------------------ commands (paho callback, on the loop)

    def _on_message(self, message: paho.MQTTMessage) -> None:
        topic, payload = message.topic, bytes(message.payload)
        if self.settings.primary_host and topic == spb.SparkplugTopics.state(self.settings.primary_host):
            self._on_host_state(payload)
            return
        try:
            commands = spb.decode_command(payload)
        except LinkError as exc:
            log.warning("sparkplug: ignored a message on %s: %s", topic, exc)
            return
        if topic == self.topics.ncmd:
            names = {c.name for c in commands if c.raw is True}
            if spb.REBIRTH in names:
                log.info("sparkplug: rebirth requested (NCMD Node Control/Rebirth)")
                self._rebirth = True
                self._wake.set()
            return
        device = topic.rsplit("/", 1)[-1]
        if device not in self.devices:
            log.warning("sparkplug: DCMD for unknown device %r ignored", device)
            return
        for command in commands:
            self._on_device_command(device, command)

    def _on_device_command(self, device: str, command: spb.Command) -> None:
        if not self.settings.accept_writes or self.request_write is None:
            self._refusals += 1
            level = logging.WARNING if self._refusals == 1 else logging.DEBUG
            log.log(level, "sparkplug: DCMD %s = %r refused: sparkplug.accept_writes is false", command.name,
                    command.raw)
            return
        if self.owner.get(command.name) != device:
            log.warning("sparkplug: DCMD to device %s names %r, not one of its points; ignored", device, command.name)
            return
        datatype = self._datatypes.get(command.name, spb.DOUBLE)
        value = spb.command_value(command, datatype)
        try:
            self._writes.put_nowait((device, command.name, value))
        except asyncio.QueueFull:
            log.warning("sparkplug: DCMD %s refused: %d writes already wait for the safety gate", command.name,
                        WRITE_QUEUE)

    async def _writer(self) -> None:
        """DCMD writes, one at a time, through the safety gate (the agent's ``request_write`` callback)."""
        while True:
            device, point, value = await self._writes.get()
            assert self.request_write is not None
            applied, verdict = await self.request_write(point, value)
            level = logging.INFO if applied else logging.WARNING
            log.log(level, "sparkplug: DCMD %s/%s = %r: %s", device, point, value, verdict)

    def _on_host_state(self, payload: bytes) -> None:
        state = spb.host_state(payload)
        if state is None:
            log.warning("sparkplug: ignored a STATE message of %s that is not {online, timestamp} JSON",
                        self.settings.primary_host)
            return
        online, ts = state
        if ts < self._host_ts:
            return  # older than the last one we acted on: the spec says to ignore it
        self._host_ts = ts
        if online:
            if not self._host_online.is_set():
                log.info("sparkplug: primary host %s is online", self.settings.primary_host)
            self._host_online.set()
        else:
            self._host_online.clear()
            if self.born:
                self._leave = True
                self._wake.set()


def _read_bd_seq(path: Path) -> int | None:
    try:
        value = json.loads(path.read_text()).get("bd_seq")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    except OSError as exc:
        raise LinkError(f"{path}: cannot read the Sparkplug bdSeq: {exc}") from exc
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255 else None


def _write_bd_seq(path: Path, bd_seq: int) -> None:
    """Replace the state file atomically: a crash leaves the old bdSeq or the new, never half a file."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps({"bd_seq": bd_seq}))
        os.replace(tmp, path)
    except OSError as exc:
        raise LinkError(f"{path}: cannot store the Sparkplug bdSeq: {exc}") from exc


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
