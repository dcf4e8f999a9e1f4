"""Remote management: signed commands over MQTT, checked, authorised, executed and audited.

A command arrives on ``{topic_prefix}/{site}/{gateway_id}/cmd`` as one JSON object (the envelope,
see :mod:`edge_agent.remote.envelope`)::

    {"id", "name", "args": {...}, "operator", "issued_at", "expires_at", "sig"}

Checks run in this order and the first failure answers with its error code:

==================  =====================================================================
code                meaning
==================  =====================================================================
too_large           the payload is over ``[commands] max_payload`` bytes
bad_json            not UTF-8 JSON, not an object, NaN/Infinity, lone surrogates, too deep
missing_field       one of id, name, args, operator, issued_at, expires_at, sig is absent
bad_field           a field has the wrong type (args not an object, sig not base64, ...)
bad_response_topic  the MQTT 5 Response Topic is under ``{topic_prefix}/`` but not under this
                    gateway's ``.../cmd/response``, or is no topic name (answered on
                    ``.../cmd/response``; the command does not run)
unknown_operator    no configured operator of that name (or their key cannot be read)
bad_signature       the signature does not verify with the operator's key
bad_validity        expires_at not after issued_at, or further than ``max_validity`` from it
not_yet_valid       issued_at is in the future by more than ``clock_skew``
expired             expires_at is in the past by more than ``clock_skew``
replayed            a command with this id was already accepted (ids survive restarts)
unknown_command     no command of that name (there is no shell, file-read or exec command)
forbidden           the operator's role is below the command's (viewer < operator < admin)
bad_args            missing, unknown or wrongly typed arguments, unknown point/model/device
busy                too many commands in progress, or another config change is running
unavailable         the command needs a part that is not configured (e.g. no optimiser)
rejected            write: the safety gate refused the value (the verdict is in ``detail``)
invalid_config      set_config/reload: the config does not validate (``detail.problems``)
needs_restart       set_config/reload: agent.* or twin.* changed; apply locally and restart
rolled_back         set_config: not healthy within ``config_deadline``; previous config back
hash_mismatch       update_model: the bytes do not have the given sha256
invalid_model       update_model: the model does not load or breaks its contract; old kept
failed              the command ran and failed (write not read back, file not saved, ...)
internal            a bug; logged with its traceback
==================  =====================================================================

Every command, accepted or not, leaves an audit record: a twin event of kind ``command`` (so it
also goes out on the ``events`` topic) naming who, what, when and the outcome. What arrives
before its signature is verified, and replays however well signed, cost bounded work, bytes and
log lines (see :mod:`edge_agent.remote.intake`): large messages pass a byte budget before they
are parsed off the event loop, refusals are answered and audited within a rate and otherwise
counted into one summary per minute, and their audit records keep sizes, hashes and short
escaped prefixes of the fields, never the fields themselves. Replay ids are per operator.

Responses go through the outbox (never straight to paho): to the request's MQTT 5 Response
Topic with its Correlation Data when present, else to ``.../cmd/response``. A Response Topic
under ``{topic_prefix}/`` must be under this gateway's own ``.../cmd/response``: the gateway
never answers, under its own identity, on another gateway's topics or its own data topics.
Topics outside the prefix stay allowed (operator tools use their own reply topics). What each command
does is in :mod:`edge_agent.remote.handlers` and :mod:`edge_agent.remote.admin`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.config import ROLES, Operator
from edge_agent.errors import CommandError, ConfigError, ModelError, TwinError
from edge_agent.remote.call import Call, Spec
from edge_agent.remote.envelope import (
    Envelope,
    EnvelopeError,
    Keyring,
    parse,
    response,
    short,
    valid_topic,
    verify,
)
from edge_agent.remote.gateway import Gateway
from edge_agent.remote.handlers import COMMANDS
from edge_agent.remote.intake import (
    BIG_QUEUE,
    PREFIX,
    SMALL,
    SUMMARY_INTERVAL,
    Intake,
    digest,
    field_summary,
)
from edge_agent.remote.replay import REPLAY_FILE, REPLAY_MARGIN, ReplayStore
from edge_agent.store.messages import json_safe

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32  # verified commands running at once; more are answered "busy"


@dataclass(frozen=True)
class Reply:
    """What was answered: the body, where it went, and the correlation data echoed."""

    body: dict[str, Any]
    topic: str | None
    correlation: bytes | None


@dataclass(frozen=True)
class Checked:
    """A message after parsing and verification: the envelope and its operator, or why it was refused."""

    payload_size: int
    sha256: str
    topic: str | None  # where to answer (None: .../cmd/response)
    correlation: bytes | None
    received: float
    envelope: Envelope | None = None
    operator: Operator | None = None  # set once the signature and validity window check out
    error: CommandError | None = None
    echo: str | None = None  # the request's id for the answer, when it could be read
    big: bool = False


class CommandHandler:
    """Receives commands for one gateway; created by the agent when ``[commands] enabled``."""

    def __init__(self, gateway: Gateway, *, commands: Mapping[str, Spec] = COMMANDS, flood_rate: float = 1.0,
                 flood_burst: float = 60.0) -> None:
        self.gateway = gateway
        self.keyring = Keyring()
        self.replay = ReplayStore(gateway.config.agent.data_dir / REPLAY_FILE)
        self.commands = dict(commands)
        self.config_lock = asyncio.Lock()
        self.intake = Intake(answer_rate=flood_rate, answer_burst=flood_burst)
        self.handled = 0
        self.dropped = 0
        self._running = 0  # verified commands in progress
        self._big: deque[tuple[bytes, str | None, bytes | None, float]] = deque()
        self._big_ready = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._guard: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def attach(self) -> None:
        """Tie in-flight commands to the agent's life: they are cancelled when it stops."""
        if self._guard is None or self._guard.done():
            self._guard = self.gateway.spawn(self._guarding(), "commands")

    async def _guarding(self) -> None:
        worker = asyncio.create_task(self._big_lane(), name="commands-large")
        try:
            try:  # open (or set aside and renew) the replay store now, not at the first command
                await asyncio.to_thread(self.replay.open)
            except TwinError as exc:
                log.error("%s; commands are answered \"failed\" until it can be opened", exc)
            self._report_storage()
            while True:
                await asyncio.sleep(min(5.0, SUMMARY_INTERVAL))
                self._summarise()
        finally:
            worker.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.wait([worker, *self._tasks], timeout=5.0)
            self._summarise(force=True)
            await asyncio.to_thread(self.replay.close)

    def _summarise(self, *, force: bool = False) -> None:
        record = self.intake.summary(force=force)
        if record is not None and (record["suppressed"] or record["dropped"]):
            self.gateway.record_event({
                "ts": time.time(), "source": "commands", "kind": "command", "state": "suppressed",
                "message": f"{sum(record['refused'].values())} unverified or replayed commands refused and "
                           f"{record['dropped']} dropped unread in {record['seconds']:g} s; "
                           f"{record['suppressed'] + record['dropped']} without their own record", **record})

    # ------------------------------------------------------------------ input

    def on_message(self, message: paho.MQTTMessage) -> None:
        """paho's callback (on the event loop): check a small message at once, queue a large one."""
        properties = getattr(message, "properties", None)
        topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        self.submit(bytes(message.payload), topic if isinstance(topic, str) else None,
                    bytes(correlation) if correlation is not None else None)

    def submit(self, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        """Take one message from the network (on the event loop; never blocks, never raises).

        A small one is parsed and verified here and now (bounded: well under a millisecond), so
        a signed command never waits behind a flood; a large one waits for the worker thread
        within the byte budget, or is dropped unread.
        """
        try:
            received = time.time()
            size = len(payload)
            self.intake.count(size)
            if size <= SMALL:
                self._route(self._check(payload, response_topic, correlation, received))
                return
            if size > self.gateway.config.commands.max_payload:  # refused unread, whatever it says
                self._route(self._check(payload, response_topic, correlation, received))
                return
            self.intake.resize(self.gateway.config.commands.max_payload)
            if len(self._big) >= BIG_QUEUE or not self.intake.admit_big(size):
                if len(self._big) >= BIG_QUEUE:
                    self.intake.drop(size)
                self.dropped += 1
                return
            self._big.append((payload, response_topic, correlation, received))
            self._big_ready.set()
        except Exception:  # paho's callback must never see our bugs
            log.exception("commands: unexpected error taking a message")

    async def _big_lane(self) -> None:
        """Parse and verify large messages in a worker thread, one at a time, in arrival order."""
        while True:
            await self._big_ready.wait()
            self._big_ready.clear()
            while self._big:
                payload, topic, correlation, received = self._big.popleft()
                checked = await asyncio.to_thread(self._check, payload, topic, correlation, received, big=True)
                self._route(checked)

    def _route(self, checked: Checked) -> None:
        """Start what a checked message leads to: its command, or its (budgeted) refusal."""
        if checked.operator is None:
            if self.intake.refuse(checked.error.code if checked.error else "?", checked.payload_size):
                self._spawn(self._answer_refusal(checked))
            return
        if self._running >= MAX_IN_FLIGHT:
            self.dropped += 1
            self._spawn(self._finish(checked, CommandError("busy", f"{self._running} commands in progress; "
                                                                   "try again")))
            return
        self._spawn(self._execute(checked))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(self._guarded(coro), name="command")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guarded(coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not kill the agent; commands answer "internal" inside
            log.exception("commands: unexpected error")

    async def handle(self, payload: bytes, response_topic: str | None = None,
                     correlation: bytes | None = None) -> Reply | None:
        """Check, run, audit and answer one command, awaited; returns the reply (None when suppressed).

        The network path is :meth:`submit`, which adds the budgets for large messages.
        """
        received = time.time()
        if len(payload) > SMALL:
            checked = await asyncio.to_thread(self._check, payload, response_topic, correlation, received, big=True)
        else:
            checked = self._check(payload, response_topic, correlation, received)
        if checked.operator is None:
            if not self.intake.refuse(checked.error.code if checked.error else "?", checked.payload_size):
                return None
            return await self._answer_refusal(checked)
        return await self._execute(checked)

    # ------------------------------------------------------------------ checks (pure CPU, any thread)

    def _check(self, payload: bytes, topic: str | None, correlation: bytes | None, received: float, *,
               big: bool = False) -> Checked:
        """Parse, check the response topic, verify operator, signature and validity window."""
        config = self.gateway.config
        sha256 = digest(payload)
        base = Checked(len(payload), sha256, topic, correlation, received, big=big)
        earlier = self.intake.replay_of(sha256)
        if earlier is not None and earlier[1]:  # exactly these bytes were accepted: no need to read them
            return _refused(base, CommandError("replayed", f"command {short(earlier[1])!r} was already received"),
                            echo=earlier[1])
        self.intake.parsed += 1
        try:
            envelope = parse(payload, config.commands.max_payload)
        except EnvelopeError as exc:
            return _refused(base, exc, echo=exc.echo)
        checked = Checked(base.payload_size, sha256, topic, correlation, received, envelope=envelope,
                          echo=envelope.id, big=big)
        problem = self._topic_problem(topic)
        if problem is not None:
            return _refused(checked, CommandError("bad_response_topic", problem), echo=envelope.id, topic=None)
        try:
            operator = verify(envelope, config, self.keyring, received)
        except CommandError as exc:
            return _refused(checked, exc, echo=envelope.id)
        return Checked(checked.payload_size, sha256, topic, correlation, received, envelope, operator,
                       echo=envelope.id, big=big)

    def _topic_problem(self, topic: str | None) -> str | None:
        """Why the gateway must not answer on ``topic`` (None: it may)."""
        if topic is None:
            return None
        if not valid_topic(topic):
            return "the response topic is not a topic name one may publish to; answered on .../cmd/response"
        config = self.gateway.config
        if config.mqtt is None:
            return None
        prefix = config.mqtt.topic_prefix
        own = f"{prefix}/{config.agent.site}/{config.agent.id}/cmd/response"
        if topic.startswith(prefix + "/") and topic != own and not topic.startswith(own + "/"):
            return (f'response topic "{short(topic)}" is under "{prefix}/" but not under this gateway\'s "{own}"; '
                    "answered on .../cmd/response instead; the command did not run")
        return None

    # ------------------------------------------------------------------ running

    async def _execute(self, checked: Checked) -> Reply | None:
        """Claim the id, authorise, run, audit and answer a verified command."""
        envelope, operator = checked.envelope, checked.operator
        assert envelope is not None and operator is not None
        if checked.big:
            self.intake.verified(checked.payload_size, big=True)
        config = self.gateway.config
        self._running += 1
        try:
            keep_until = envelope.expires_at + config.commands.clock_skew + REPLAY_MARGIN
            try:
                claimed = await asyncio.to_thread(self.replay.claim, envelope, keep_until, checked.received)
            except TwinError as exc:
                return await self._finish(checked, CommandError("failed", str(exc)))
            finally:
                self._report_storage()
            if not claimed:  # a replay is as cheap to send as junk: it counts against the same budget
                replayed = _refused(checked, CommandError("replayed", f"command {short(envelope.id)!r} was "
                                                                      "already received"), echo=envelope.id)
                if not self.intake.refuse("replayed", checked.payload_size):
                    return None
                return await self._answer_refusal(replayed)
            self.intake.accepted(checked.sha256, envelope.operator, envelope.id)
            try:
                spec = self._authorise(envelope, operator)
                result = await spec.run(Call(self.gateway, envelope, operator, self.keyring, self.config_lock))
                body = response(envelope.id, result=result)
            except CommandError as exc:
                body = response(envelope.id, error=exc)
            except (TwinError, ModelError, ConfigError) as exc:
                body = response(envelope.id, error=CommandError("failed", str(exc)))
            except Exception as exc:
                log.exception("commands: bug while handling %s", short(envelope.name))
                body = response(envelope.id, error=CommandError("internal", f"internal error: {type(exc).__name__}"))
            return await self._reply(checked, body)
        finally:
            self._running -= 1

    async def _finish(self, checked: Checked, error: CommandError) -> Reply:
        """Answer a verified command that could not run."""
        assert checked.envelope is not None
        return await self._reply(checked, response(checked.envelope.id, error=error))

    async def _reply(self, checked: Checked, body: dict[str, Any]) -> Reply:
        self.handled += 1
        self._audit(checked, body)
        return await self._answer(body, checked.topic, checked.correlation)

    def _report_storage(self) -> None:
        """Once: the replay store was set aside (an event, as the agent does for its own files)."""
        notice, self.replay.notice = self.replay.notice, None
        if notice is not None:
            self.gateway.record_event({"ts": time.time(), "source": "storage", "kind": "storage",
                                       "state": "set_aside", "message": notice})

    def _authorise(self, envelope: Envelope, operator: Operator) -> Spec:
        spec = self.commands.get(envelope.name)
        if spec is None:
            raise CommandError("unknown_command", f'no command "{short(envelope.name)}"; known: '
                                                  f'{", ".join(sorted(self.commands))}')
        if ROLES.index(operator.role) < ROLES.index(spec.role):
            raise CommandError("forbidden", f'"{envelope.name}" needs role {spec.role}; '
                                            f'"{operator.name}" is {operator.role}')
        unknown = sorted(set(envelope.args) - set(spec.required) - set(spec.optional))
        missing = [a for a in spec.required if a not in envelope.args]
        if unknown or missing:
            raise CommandError("bad_args", "; ".join(
                ([f"missing: {', '.join(missing)}"] if missing else [])
                + ([f"unknown: {', '.join(short(a) for a in unknown[:10])}"] if unknown else [])))
        return spec

    # ------------------------------------------------------------------ output

    async def _answer_refusal(self, checked: Checked) -> Reply:
        """Answer and audit a refusal the budget allowed (the caller charged it)."""
        assert checked.error is not None
        self.handled += 1
        body = response(checked.echo, error=checked.error)
        self._audit_unverified(checked, body)
        return await self._answer(body, checked.topic, checked.correlation)

    def _audit(self, checked: Checked, body: dict[str, Any]) -> None:
        """The audit record of a verified command: who, what, its arguments (big values as size and hash)."""
        envelope, operator = checked.envelope, checked.operator
        assert envelope is not None and operator is not None
        error = body.get("error") or {}
        outcome = "ok" if body["ok"] else f"{error.get('code')}: {short(error.get('message'), 300)}"
        record: dict[str, Any] = {
            "ts": checked.received, "source": "commands", "kind": "command",
            "state": "ok" if body["ok"] else error["code"],
            "message": f"{operator.name}: {short(envelope.name)}: {outcome}", "command_id": envelope.id,
            "command": short(envelope.name), "operator": operator.name, "role": operator.role, "ok": body["ok"],
            "code": None if body["ok"] else error.get("code"), "args": _summarise(envelope.args),
            "bytes": checked.payload_size, "duration_s": time.time() - checked.received,
        }
        log.log(logging.INFO if body["ok"] else logging.WARNING, "commands: %s", record["message"])
        self.gateway.record_event(record)

    def _audit_unverified(self, checked: Checked, body: dict[str, Any]) -> None:
        """The audit record of a refusal nobody vouched for: sizes, hashes and short escaped prefixes only."""
        error = body["error"]
        envelope = checked.envelope
        who = f'unverified "{short(envelope.operator, PREFIX)}"' if envelope else "unverified"
        what = short(envelope.name, PREFIX) if envelope else "?"
        record: dict[str, Any] = {
            "ts": checked.received, "source": "commands", "kind": "command", "state": error["code"],
            "message": f"{who}: {what}: {error['code']}: {short(error['message'], 200)}",
            "command_id": checked.echo, "command": what,
            "operator": short(envelope.operator, PREFIX) if envelope else None,
            "role": None, "ok": False, "code": error["code"], "args": None, "bytes": checked.payload_size,
            "sha256": checked.sha256, "duration_s": time.time() - checked.received,
        }
        if envelope is not None:
            record["fields"] = {"operator": field_summary(envelope.operator), "name": field_summary(envelope.name),
                                "args": {"keys": len(envelope.args)}}
        if self.intake.first_of_interval():
            log.warning("commands: %s (further refusals are summed up every %g s)", record["message"],
                        SUMMARY_INTERVAL)
        else:
            log.debug("commands: %s", record["message"])
        self.gateway.record_event(record)

    async def _answer(self, body: dict[str, Any], topic: str | None, correlation: bytes | None) -> Reply:
        reply = Reply(body, topic, correlation)
        payload = json.dumps(json_safe(body), ensure_ascii=False, default=str,
                             allow_nan=False).encode("utf-8", "backslashreplace")
        try:
            if not await self.gateway.respond(topic, payload, correlation):
                log.debug("commands: no MQTT link; response to %s not sent", short(body["id"]))
        except TwinError as exc:
            log.error("%s; response to command %s lost", exc, short(body["id"]))
        return reply


def _refused(checked: Checked, error: CommandError, *, echo: str | None, topic: Any = ...) -> Checked:
    """``checked`` refused with ``error`` (and answered on ``topic`` when given)."""
    return Checked(checked.payload_size, checked.sha256, checked.topic if topic is ... else topic,
                   checked.correlation, checked.received, checked.envelope, None, error, echo, checked.big)


def _summarise(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as the audit keeps them: big values (config text, model bytes) as size and hash."""
    summary: dict[str, Any] = {}
    for key, value in list(args.items())[:20]:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > 200:
            summary[short(key)] = {"bytes": len(text), "sha256": digest(text.encode("utf-8", "surrogatepass"))}
        else:
            summary[short(key)] = value
    return summary
