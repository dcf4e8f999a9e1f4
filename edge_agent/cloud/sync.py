"""Cloud sync: readings -> telemetry messages in the outbox -> the MQTT link, paced and acknowledged.

Data path. The agent hands every reading the twin kept to :meth:`Sync.add`. Every
``mqtt.publish_interval`` the batcher turns what has gathered into telemetry messages of at
most ``mqtt.max_samples`` samples and appends them to the outbox in one transaction, online or
not. So a reading waits in memory for at most one publish interval (and is flushed on a clean
stop); once in the outbox it survives ``kill -9`` and is deleted only after its PUBACK. With
telemetry v2 what waits is not the readings but their encoded ``reads`` entries, made by
:meth:`Sync.prepare` in the twin writer's worker thread right after the twin stored them.

Draining. When the link comes up, everything already in the outbox is the *backlog*; it is
replayed in order, paced by a token bucket of ``mqtt.replay_rate`` samples per second so a long
outage does not trip the cloud's rate limits. Messages appended after the link came up are
*live* and go out first, unpaced, also in order. The two streams interleave, so a receiver
sees live seqs run ahead while the backlog fills in behind them: every seq arrives, and the
backlog's own seqs arrive in order. At most ``mqtt.max_inflight`` messages are unacknowledged.

The retained ``twin`` snapshot is appended on connect and on change, at most every
``mqtt.twin_interval``; a change of a desired state (:meth:`Sync.twin_changed`) goes out at the
next publish interval. ``state`` "online" is appended on connect, and the broker publishes the
Will ("offline") when the agent goes away, cleanly or not.

Incoming: ``cmd`` goes to ``on_message`` and the retained ``desired`` document to ``on_desired``,
each subscribed only when its receiver is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from drivers.base import Reading
from edge_agent.cloud import payloads
from edge_agent.cloud.link import MqttLink, OnMessage
from edge_agent.config import AgentConfig
from edge_agent.errors import LinkError, TwinError
from edge_agent.pacing import TokenBucket
from edge_agent.store import floats
from edge_agent.store.messages import Draft, Message
from edge_agent.store.outbox import Outbox
from edge_agent.tasks import wait_event

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = logging.getLogger(__name__)

Snapshot = Callable[[], list[dict[str, Any]]]

STOP_GRACE = 2.0  # seconds a clean stop waits for the outbox to be acknowledged while online
HELD_SAMPLES = 100_000  # samples kept in memory while the outbox cannot be written (disk full)


class Sync:
    """Keeps the cloud in step with the twin through the outbox."""

    def __init__(self, config: AgentConfig, outbox: Outbox, snapshot: Snapshot,
                 on_message: OnMessage | None = None, on_desired: OnMessage | None = None) -> None:
        assert config.mqtt is not None
        self.cfg = config.mqtt
        self.gateway = config.agent.id
        self.outbox = outbox
        self.snapshot = snapshot
        self.topics = payloads.Topics.of(self.cfg.topic_prefix, config.agent.site, config.agent.id)
        self._receivers = {topic: receiver for topic, receiver in
                           ((self.topics.cmd, on_message), (self.topics.desired, on_desired)) if receiver}
        # Commands and desired documents larger than [commands] max_payload are refused anyway; with
        # room for the topic and properties, the broker drops what is bigger still before it costs us
        # a byte (MQTT 5).
        max_packet = config.commands.max_payload + 64 * 1024 if self._receivers else None
        self.link = MqttLink(self.cfg, will_topic=self.topics.state,
                             will_payload=payloads.state(self.gateway, "offline"),
                             subscriptions=tuple(self._receivers), on_message=self._route if self._receivers else None,
                             max_packet=max_packet)
        self.link.on_ack = self._on_ack
        self.link.on_refused = self._on_refused
        self.link.on_up = self._wake_up
        self.bucket = TokenBucket(self.cfg.replay_rate, max(self.cfg.replay_rate, self.cfg.max_samples))
        self.encoder = payloads.telemetry_encoder(self.gateway, self.cfg.telemetry_version)
        self.published = 0
        self.acked = 0
        self.unqueued = 0  # samples let go because the outbox could not be written (they are in the twin)
        self._append_failing = False
        self._samples: list[Reading] = []  # telemetry v1: the readings until the next publish
        # telemetry v2: the encoded entries of the readings (and how many samples they hold)
        self._compact = self.encoder if isinstance(self.encoder, payloads.CompactTelemetryEncoder) else None
        self._entries: list[tuple[str, int]] = []
        self._held = 0
        self._twin_dirty = True
        self._twin_urgent = False  # a desired state changed: the snapshot goes out at the next batch
        self._twin_sent = 0.0
        self._mids: dict[int, int] = {}  # paho mid -> outbox id
        self._responses: set[int] = set()  # mids of command responses
        self._acks: list[int] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sharing = False  # told edge_agent.store.floats that this sync takes the twin's texts

    # ------------------------------------------------------------------ input

    def prepare(self, readings: Sequence[Reading]) -> list[tuple[str, int]] | None:
        """With telemetry v2, the encoded ``reads`` entries of ``readings`` (called by the twin writer in
        its worker thread, right after storing them; one call at a time); None with v1."""
        if self._compact is None:
            return None
        return self._compact.entries(readings, self.cfg.max_samples)

    def add(self, readings: Sequence[Reading], prepared: list[tuple[str, int]] | None = None) -> None:
        """Readings the twin kept (and, with v2, what :meth:`prepare` made of them); they become
        telemetry at the next publish interval."""
        if not readings:
            return
        self._twin_dirty = True
        if self._compact is None:
            self._samples.extend(readings)
            return
        entries = prepared if prepared is not None else self._compact.entries(readings, self.cfg.max_samples)
        self._entries.extend(entries)
        self._held += len(readings)

    def twin_changed(self) -> None:
        """A desired state changed: republish the twin snapshot at the next publish interval."""
        self._twin_dirty = self._twin_urgent = True

    def _route(self, message: paho.MQTTMessage) -> None:
        receiver = self._receivers.get(message.topic)
        if receiver is not None:
            receiver(message)
        else:
            log.debug("mqtt: message on unexpected topic %r ignored", message.topic)

    def event(self, kind: str, fields: dict[str, Any]) -> Draft:
        """A draft ``events`` message, for :meth:`append`."""
        return Draft(kind="event", topic=self.topics.events,
                     payload=lambda stamp: payloads.event(self.gateway, stamp, kind, fields))

    def response(self, topic: str | None, payload: bytes, correlation: bytes | None) -> Draft:
        """A draft command response: to the request's Response Topic, else ``.../cmd/response``.

        The caller checks that ``topic`` is a valid topic name to publish to (no wildcards).
        """
        return Draft(kind="response", topic=topic or self.topics.cmd_response, payload=payload,
                     correlation=correlation)

    async def respond(self, topic: str | None, payload: bytes, correlation: bytes | None) -> None:
        """Store one command response in the outbox (see :meth:`response`)."""
        await self.append([self.response(topic, payload, correlation)])

    async def append_event(self, kind: str, fields: dict[str, Any]) -> None:
        """Store one ``events`` message in the outbox (the twin writer's records go out this way)."""
        await self.append([self.event(kind, fields)])

    async def append(self, drafts: list[Draft]) -> None:
        """Store messages in the outbox (off the event loop) and wake the drain."""
        if drafts:
            await asyncio.to_thread(self.outbox.append, drafts)
            self._wake.set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.cfg.telemetry_version == 2:  # the v2 encoder takes the float texts the twin makes
            floats.share(True)
            self._sharing = True
        for coro, name in ((self.link.run(), "mqtt-link"), (self._batcher(), "mqtt-batcher"),
                           (self._drain(), "mqtt-drain")):
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        """Put what is gathered into the outbox, deliver it while online (at most ``STOP_GRACE`` s),
        leave the broker (Will: offline), stop. What is not acknowledged by then stays in the outbox."""
        with contextlib.suppress(TwinError):
            await self._batch()
            await self._deliver_pending(STOP_GRACE)
        drain = [t for t in self._tasks if t.get_name() == "mqtt-drain"]
        for task in drain:
            task.cancel()
        await self._settle(drain)
        with contextlib.suppress(TwinError):
            await self._ack_pending()
        await self.link.close()
        for task in self._tasks:
            task.cancel()
        await self._settle(self._tasks)
        self._tasks.clear()
        if self._sharing:
            floats.share(False)
            self._sharing = False

    async def _deliver_pending(self, grace: float) -> None:
        """Let the drain empty the outbox for up to ``grace`` s; returns at once when offline.

        Without this a clean stop cancelled the drain right after the last batch was appended, so
        the samples of the last publish interval only reached the cloud after the next start.
        """
        deadline = time.monotonic() + grace
        while self.link.connected.is_set() and time.monotonic() < deadline:
            if await asyncio.to_thread(lambda: self.outbox.stats().depth) == 0:
                return
            await asyncio.sleep(0.02)

    @staticmethod
    async def _settle(tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ batching

    async def _batcher(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.publish_interval)
            try:
                await self._batch()
            except TwinError as exc:
                self._shed()
                if not self._append_failing:
                    log.error("%s; up to %d samples kept in memory for the next attempt", exc, HELD_SAMPLES)
                else:
                    log.debug("outbox still not writable: %s", exc)
                self._append_failing = True
            else:
                if self._append_failing:
                    log.info("outbox: writing again; %d samples could not be queued meanwhile", self.unqueued)
                self._append_failing = False

    def _shed(self) -> None:
        """Bounded while the outbox cannot be written: the oldest samples go (the twin keeps them; a
        later resync can find them)."""
        excess = len(self._samples) - HELD_SAMPLES
        if excess > 0:
            del self._samples[:excess]
            self.unqueued += excess
        cut = 0
        while self._held > HELD_SAMPLES and cut < len(self._entries):
            count = self._entries[cut][1]
            self._held -= count
            self.unqueued += count
            cut += 1
        del self._entries[:cut]

    async def _batch(self) -> None:
        samples, self._samples = self._samples, []
        entries, held, self._entries, self._held = self._entries, self._held, [], 0
        drafts = self._telemetry_drafts(samples) + self._entry_drafts(entries)
        now = time.monotonic()
        if self._twin_dirty and (self._twin_urgent or now - self._twin_sent >= self.cfg.twin_interval):
            drafts.append(await self._twin_draft())
            self._twin_sent, self._twin_dirty, self._twin_urgent = now, False, False
        try:
            await self.append(drafts)
        except TwinError:
            self._samples[:0] = samples
            self._entries[:0] = entries
            self._held += held
            raise

    def _telemetry_drafts(self, samples: list[Reading]) -> list[Draft]:
        size = self.cfg.max_samples
        drafts = []
        for start in range(0, len(samples), size):
            chunk = samples[start:start + size]
            drafts.append(Draft(kind="telemetry", topic=self.topics.telemetry, samples=len(chunk),
                                payload=lambda stamp, chunk=chunk: self.encoder.encode(chunk, stamp)))  # type: ignore[misc]
        return drafts

    def _entry_drafts(self, entries: list[tuple[str, int]]) -> list[Draft]:
        """v2: telemetry messages of whole entries, each of at most ``max_samples`` samples."""
        compact, size = self._compact, self.cfg.max_samples
        drafts: list[Draft] = []
        if compact is None or not entries:
            return drafts
        texts: list[str] = []
        count = 0
        for text, samples in entries:
            if count + samples > size and texts:
                drafts.append(self._entry_draft(compact, texts, count))
                texts, count = [], 0
            texts.append(text)
            count += samples
        drafts.append(self._entry_draft(compact, texts, count))
        return drafts

    def _entry_draft(self, compact: payloads.CompactTelemetryEncoder, texts: list[str], count: int) -> Draft:
        return Draft(kind="telemetry", topic=self.topics.telemetry, samples=count,
                     payload=lambda stamp: compact.encode_entries(texts, stamp))

    async def _twin_draft(self) -> Draft:
        points = self.snapshot()
        return Draft(kind="twin", topic=self.topics.twin, retain=True,
                     payload=payloads.twin_snapshot(self.gateway, points))

    # ------------------------------------------------------------------ draining

    def _wake_up(self) -> None:
        self._wake.set()

    def _on_refused(self, mid: int) -> bool:
        """A command response the broker refused (its Response Topic is not ours to publish to) is
        dropped; anything else stays in the outbox and the link reconnects."""
        if mid not in self._responses:
            return False
        log.warning("mqtt: the broker refused a command response (message %d); dropped", mid)
        self._on_ack(mid)
        return True

    def _on_ack(self, mid: int) -> None:
        self._responses.discard(mid)
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
                await self._drain_session()
            except LinkError as exc:
                log.debug("mqtt: drain interrupted: %s", exc)
            except TwinError as exc:
                log.error("%s; retrying", exc)
                await asyncio.sleep(1.0)

    async def _drain_session(self) -> None:
        """One connection's worth of draining: backlog paced, live first."""
        await self._ack_pending()
        await asyncio.to_thread(self.outbox.requeue)
        self._mids.clear()
        self._responses.clear()
        boundary = await asyncio.to_thread(self.outbox.last_id)
        backlog_cursor, live_cursor = 0, boundary
        online = Draft(kind="state", topic=self.topics.state, retain=True,
                       payload=payloads.state(self.gateway, "online"))
        await self.append([online, await self._twin_draft()])
        if boundary:
            log.info("mqtt: replaying a backlog of up to %d messages at %g samples/s", boundary,
                     self.cfg.replay_rate)
        while self.link.connected.is_set():
            self._wake.clear()
            await self._ack_pending()
            live = await asyncio.to_thread(self.outbox.take_range, live_cursor, None, self.cfg.max_inflight)
            live_cursor = self._publish(live, live_cursor)
            delay = 1.0
            if backlog_cursor < boundary:
                backlog_cursor, delay = await self._replay(backlog_cursor, boundary)
                if backlog_cursor >= boundary:
                    log.info("mqtt: backlog replayed")
            # not wait_for: on Python 3.11 it swallows a cancel that arrives while the awaited event
            # has just been set (https://github.com/python/cpython/issues/86296), and stop() sets
            # _wake right before cancelling this task, so the drain never ended.
            await wait_event(self._wake, delay)

    async def _replay(self, cursor: int, boundary: int) -> tuple[int, float]:
        """Send backlog messages the token bucket allows; return the new cursor and how long to wait."""
        # Read only what the bucket can pay for: reading max_inflight payloads to send one and hand
        # the rest back cost more CPU than the sending (measured: 3.4 -> 2.0 us per paced sample).
        wait = self.bucket.wait_time(self.cfg.max_samples)
        if wait > 0:
            return cursor, min(wait, 1.0)
        affordable = max(1, min(self.cfg.max_inflight, int(self.bucket.tokens // self.cfg.max_samples)))
        batch = await asyncio.to_thread(self.outbox.take_range, cursor, boundary, affordable)
        if not batch:
            if self.outbox.inflight >= self.cfg.max_inflight:
                # No room, not the end of the backlog: wait for acks (they wake the drain). Taking
                # this for the end used to strand the rest of the backlog until the next reconnect.
                return cursor, 1.0
            return boundary, 1.0
        allowed = []
        for message in batch:
            if not self.bucket.try_take(max(1, message.samples)):
                break
            allowed.append(message)
        held = batch[len(allowed):]
        if held:  # not sent: hand them back so they count as pending, not in flight
            await asyncio.to_thread(self.outbox.release, [m.id for m in held])
        cursor = self._publish(allowed, cursor)
        wait = self.bucket.wait_time(max(1, held[0].samples)) if held else 0.0
        return cursor, max(0.0, min(wait, 1.0))

    def _publish(self, messages: list[Message], cursor: int) -> int:
        for message in messages:
            mid = self.link.publish(message.topic, message.payload, qos=message.qos, retain=message.retain,
                                    correlation=message.correlation)
            self._mids[mid] = message.id
            if message.kind == "response":
                self._responses.add(mid)
            self.published += 1
            cursor = message.id
        return cursor
