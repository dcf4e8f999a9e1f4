"""Desired state from the cloud: the twin's other half, reconciled through the safety gate.

The cloud publishes, retained and with QoS 1, on ``{topic_prefix}/{site}/{gateway_id}/desired``
a signed envelope exactly like a command (:mod:`edge_agent.remote.envelope`: same canonical JSON,
Ed25519 signature, operators and validity window) named ``desired``::

    {"id", "name": "desired", "args": {"version": 7, "points": {"chiller1.setpoint": 7.5}},
     "operator", "issued_at", "expires_at", "sig"}

Checks, in order: the envelope's shape and signature (refusals use the command error codes and
are audited like refused commands), the name, the role (``operator`` or ``admin``), the
arguments (``bad_args``), then the version. ``version`` must be greater than that of the last
document handled; any other document is ignored and nothing is written. The last handled
version is committed to the twin (``desired_documents``) *before* anything is written, so the
retained document the broker re-delivers on every reconnect, or after a restart, never writes
again (the failure of ThingsBoard IoT Gateway #2124, which re-applies stale intent). An expired
document is handled too, but not applied: its points get status ``expired``.

Each point then goes through the safety gate with source ``cloud``, one at a time, in the
document's order. Its desired state (the twin's ``desired`` table, published in the retained
``twin`` snapshot) goes ``pending`` -> ``applied`` | ``rejected`` | ``failed`` (the gate's verdict
and reason); ``rolled_back`` when the gate restores it later, ``expired`` when never applied. A
point left ``pending`` by a stop becomes ``failed`` at the next start; it is not retried: a new
version is. Documents are handled one at a time, in arrival order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_agent.config import ROLES, Operator
from edge_agent.errors import CommandError, TwinError
from edge_agent.pacing import TokenBucket
from edge_agent.remote.envelope import Envelope, Keyring, finite, parse, short, verify
from edge_agent.remote.gateway import Gateway
from edge_agent.remote.intake import BIG_RATE, SMALL, field_summary
from edge_agent.store.twin import DesiredDocument

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = logging.getLogger(__name__)

NAME = "desired"
ROLE = "operator"  # the lowest role allowed to set desired state
SOURCE = "cloud"  # the safety gate's source for every desired write
ARGS = ("version", "points")
MAX_VERSION = 2**63 - 1  # SQLite INTEGER
MAX_QUEUED = 16  # documents waiting to be handled; more are dropped (logged)
READY_WAIT = 30.0  # seconds a point waits (pending) for its device's first data after a start
SUMMARISED = 20  # points named in an audit record


@dataclass
class Outcome:
    """What became of one desired document (returned for tests and logs).

    ``state``: ``applied`` (its points went through the gate; each verdict in ``results``),
    ``expired``, ``ignored`` (version not greater than the last handled), ``refused`` (``code``
    says why) or ``suppressed`` (refused during a flood of unauthenticated documents: not audited).
    """

    state: str
    version: int | None = None
    code: str | None = None
    message: str = ""
    results: dict[str, str] = field(default_factory=dict)  # point -> applied | rejected | failed


class DesiredState:
    """Receives the cloud's desired-state documents for one gateway (with ``[commands] enabled``)."""

    def __init__(self, gateway: Gateway, *, flood_rate: float = 1.0, flood_burst: float = 60.0) -> None:
        self.gateway = gateway
        self.keyring = Keyring()
        self.handled = 0  # documents verified and checked against the last version (claimed or ignored)
        self.dropped = 0
        self.last: Outcome | None = None  # what became of the latest document
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=MAX_QUEUED)
        self._flood = TokenBucket(flood_rate, flood_burst)
        # large documents nobody has vouched for yet cost parsing: a byte budget like the commands'
        # (edge_agent/remote/intake.py), spent before they are queued
        self._big = TokenBucket(BIG_RATE, 8 * 1024 * 1024)
        self._suppressed = 0
        self._worker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle and input

    def attach(self) -> None:
        """Start handling documents in a task of the agent's (cancelled when it stops)."""
        if self._worker is None or self._worker.done():
            self._worker = self.gateway.spawn(self._work(), "desired-state")

    def on_message(self, message: paho.MQTTMessage) -> None:
        """paho's callback (on the event loop): queue the document, never block here."""
        self.submit(bytes(message.payload))

    def submit(self, payload: bytes) -> None:
        """Queue one document for the worker; dropped (logged) when too many are waiting, or when it
        is large and the byte budget for large documents is spent."""
        size = len(payload)
        if size > SMALL:
            self._big.burst = max(self._big.burst, 2.0 * self.gateway.config.commands.max_payload)
            if not self._big.try_take(size):
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("desired: large documents over the budget of %d bytes/s dropped unread (%d so far)",
                                BIG_RATE, self.dropped)
                return
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("desired: %d documents waiting; dropped one (%d bytes)", self._queue.qsize(), len(payload))

    async def _work(self) -> None:
        while True:
            payload = await self._queue.get()
            try:
                await self.handle(payload)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end desired state for the agent's life
                log.exception("desired: unexpected error")

    # ------------------------------------------------------------------ handling

    async def handle(self, payload: bytes) -> Outcome:
        """Check, claim, apply and audit one document."""
        self.last = await self._handle(payload)
        return self.last

    async def _handle(self, payload: bytes) -> Outcome:
        received = time.time()
        envelope: Envelope | None = None
        operator: Operator | None = None
        try:
            envelope = await self._parse(payload)
            operator, expired = self._verify(envelope, received)
            _authorise(envelope, operator)
            version, points = _arguments(envelope)
            status, reason = ("expired", expired.message) if expired else ("pending", "")
            document = DesiredDocument(version, envelope.id, operator.name, envelope.issued_at, envelope.expires_at,
                                       received, points, status, reason)
            claim = await self.gateway.claim_desired(document)
        except CommandError as exc:
            return self._refused(envelope, operator, exc, received)
        except TwinError as exc:
            log.error("desired: %s; document not handled", exc)
            return self._refused(envelope, operator, CommandError("failed", str(exc)), received)
        self.handled += 1
        if not claim.accepted:
            return self._ignored(envelope, operator, version, claim.last_version, claim.last_id, received)
        if expired is not None:
            outcome = Outcome("expired", version, "expired", f"not applied: {expired.message}")
            self._audit(envelope, operator, outcome, received)
            return outcome
        outcome = Outcome("applied", version)
        for point, value in points.items():
            await self._ready(point)
            verdict = await self.gateway.request_write(point, value, source=SOURCE, actor=operator.name)
            outcome.results[point] = verdict.result
        counts: dict[str, int] = {}
        for result in outcome.results.values():
            counts[result] = counts.get(result, 0) + 1
        outcome.message = ", ".join(f"{n} {result}" for result, n in sorted(counts.items())) or "no points"
        self._audit(envelope, operator, outcome, received)
        return outcome

    async def _ready(self, point: str) -> None:
        """Wait (at most READY_WAIT s) until the gate can judge ``point`` on current data.

        The retained document arrives as soon as the MQTT link is up, which after a start is often
        before the devices have connected: the gate would refuse every point for want of data,
        and a claimed version is never tried again.
        """
        deadline = time.monotonic() + READY_WAIT
        while time.monotonic() < deadline:
            if self.gateway.data_ready(point):
                return
            await asyncio.sleep(0.1)
        log.warning("desired: %s: no data from its device after %g s; asking the safety gate anyway", point,
                    READY_WAIT)

    async def _parse(self, payload: bytes) -> Envelope:
        limit = self.gateway.config.commands.max_payload
        if len(payload) > 64 * 1024:  # decode a big document off the event loop
            return await asyncio.to_thread(parse, payload, limit)
        return parse(payload, limit)

    def _verify(self, envelope: Envelope, now: float) -> tuple[Operator, CommandError | None]:
        """The operator, signature and validity window; an expired document is returned with its
        error (it is recorded as expired), every other failure raises."""
        config = self.gateway.config
        expired: CommandError | None = None
        try:
            operator = verify(envelope, config, self.keyring, now)
        except CommandError as exc:
            if exc.code != "expired":
                raise
            # verify checks the signature before the validity window: this operator signed it
            operator = next(o for o in config.commands.operators if o.name == envelope.operator)
            expired = exc
        return operator, expired

    def _ignored(self, envelope: Envelope, operator: Operator, version: int, last: int | None, last_id: str | None,
                 received: float) -> Outcome:
        message = f"version {version} is not greater than the last one handled ({last}); ignored, nothing written"
        outcome = Outcome("ignored", version, None, message)
        if envelope.id == last_id:
            # the retained document again (every reconnect, every restart): expected, and quiet
            log.debug("desired: document %r (version %d) re-delivered; already handled", envelope.id, version)
            return outcome
        log.warning("desired: %s: %s", envelope.id, message)
        outcome.code = "stale"
        self._audit(envelope, operator, outcome, received)
        return outcome

    def _refused(self, envelope: Envelope | None, operator: Operator | None, error: CommandError,
                 received: float) -> Outcome:
        outcome = Outcome("refused", None, error.code, error.message)
        if operator is None and not self._flood.try_take():
            # anyone with publish rights on the topic could otherwise fill the outbox with audit events
            self._suppressed += 1
            if self._suppressed == 1:
                log.warning("desired: flood of unauthenticated documents; audit records suppressed")
            return Outcome("suppressed", None, error.code, error.message)
        self._audit(envelope, operator, outcome, received)
        return outcome

    # ------------------------------------------------------------------ the audit trail

    def _audit(self, envelope: Envelope | None, operator: Operator | None, outcome: Outcome, received: float) -> None:
        """A twin event of kind ``command`` (also on the ``events`` topic), shaped like a command's."""
        ok = outcome.state == "applied"
        code = None if ok else outcome.code or outcome.state
        # a document nobody has vouched for keeps sizes, hashes and short escaped prefixes, never
        # its fields: a huge operator name must not fill the log, the twin and the outbox
        who = operator.name if operator else f'unverified "{short(envelope.operator)}"' if envelope else "unverified"
        what = f"{NAME} v{outcome.version}" if outcome.version is not None else NAME
        record: dict[str, Any] = {
            "ts": received, "source": NAME, "kind": "command", "state": "ok" if ok else code,
            "message": f"{who}: {what}: {'ok: ' + outcome.message if ok else f'{code}: {outcome.message}'}",
            "command_id": (envelope.id if operator else short(envelope.id)) if envelope else None, "command": NAME,
            "operator": (envelope.operator if operator else field_summary(envelope.operator)) if envelope else None,
            "role": operator.role if operator else None, "ok": ok, "code": code,
            "args": (_summarise(envelope.args) if operator else field_summary(envelope.args)) if envelope else None,
            "duration_s": time.time() - received, "version": outcome.version, "results": outcome.results or None,
        }
        if self._suppressed and operator is None:
            record["suppressed_before"], self._suppressed = self._suppressed, 0
        log.log(logging.INFO if ok else logging.WARNING, "desired: %s", record["message"])
        self.gateway.record_event(record)


def _authorise(envelope: Envelope, operator: Operator) -> None:
    """The name (a command's envelope is no desired document) and the role."""
    if envelope.name != NAME:
        raise CommandError("bad_field", f'name: expected "{NAME}" on the desired topic, got "{envelope.name}"')
    if ROLES.index(operator.role) < ROLES.index(ROLE):
        raise CommandError("forbidden", f'"{NAME}" needs role {ROLE}; "{operator.name}" is {operator.role}')


def _arguments(envelope: Envelope) -> tuple[int, dict[str, float | bool]]:
    """``version`` and ``points``, checked; CommandError(bad_args) naming the argument."""
    args = envelope.args
    unknown = sorted(set(args) - set(ARGS))
    missing = [a for a in ARGS if a not in args]
    if unknown or missing:
        raise CommandError("bad_args", "; ".join(([f"missing: {', '.join(missing)}"] if missing else [])
                                                 + ([f"unknown: {', '.join(unknown)}"] if unknown else [])))
    version = args["version"]
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise CommandError("bad_args", f"version: expected an integer from 0 to {MAX_VERSION}, got {version!r}")
    points = args["points"]
    if not isinstance(points, dict):
        raise CommandError("bad_args", f"points: expected an object of point name -> value, got "
                                       f"{type(points).__name__}")
    for name, value in points.items():
        if not name:
            raise CommandError("bad_args", "points: expected non-empty point names")
        if not isinstance(value, bool) and (not isinstance(value, int | float) or not finite(value)):
            raise CommandError("bad_args", f'points."{name}": expected a finite number or a boolean, '
                                           f"got {json.dumps(value)[:40]}")
    return version, points


def _summarise(args: dict[str, Any]) -> dict[str, Any]:
    """The document's arguments as the audit keeps them: the version and the first points."""
    points = args.get("points")
    if not isinstance(points, dict):
        return {"version": args.get("version"), "points": json.dumps(points)[:200]}
    shown = dict(list(points.items())[:SUMMARISED])
    summary: dict[str, Any] = {"version": args.get("version"), "points": shown}
    if len(points) > SUMMARISED:
        summary["more_points"] = len(points) - SUMMARISED
    return summary
