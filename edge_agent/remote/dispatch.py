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
also goes out on the ``events`` topic) naming who, what, when and the outcome. Rejections that
happen before the signature is verified are rate limited (anyone with publish rights on the
``cmd`` topic could otherwise fill the outbox, where events and responses are never dropped).

Responses go through the outbox (never straight to paho): to the request's MQTT 5 Response
Topic with its Correlation Data when present, else to ``.../cmd/response``. What each command
does is in :mod:`edge_agent.remote.handlers` and :mod:`edge_agent.remote.admin`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.config import ROLES, Operator
from edge_agent.errors import CommandError, ConfigError, ModelError, TwinError
from edge_agent.pacing import TokenBucket
from edge_agent.remote.call import Call, Spec
from edge_agent.remote.envelope import Envelope, Keyring, echo_id, parse, response, valid_topic, verify
from edge_agent.remote.gateway import Gateway
from edge_agent.remote.handlers import COMMANDS
from edge_agent.remote.replay import REPLAY_FILE, REPLAY_MARGIN, ReplayStore
from edge_agent.store.messages import json_safe

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 32  # commands handled at once; more are dropped (logged)


@dataclass(frozen=True)
class Reply:
    """What was answered: the body, where it went, and the correlation data echoed."""

    body: dict[str, Any]
    topic: str | None
    correlation: bytes | None


class CommandHandler:
    """Receives commands for one gateway; created by the agent when ``[commands] enabled``."""

    def __init__(self, gateway: Gateway, *, commands: Mapping[str, Spec] = COMMANDS, flood_rate: float = 1.0,
                 flood_burst: float = 60.0) -> None:
        self.gateway = gateway
        self.keyring = Keyring()
        self.replay = ReplayStore(gateway.config.agent.data_dir / REPLAY_FILE)
        self.commands = dict(commands)
        self.config_lock = asyncio.Lock()
        self.handled = 0
        self.dropped = 0
        self._flood = TokenBucket(flood_rate, flood_burst)
        self._suppressed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._guard: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def attach(self) -> None:
        """Tie in-flight commands to the agent's life: they are cancelled when it stops."""
        if self._guard is None or self._guard.done():
            self._guard = self.gateway.spawn(self._guarding(), "commands")

    async def _guarding(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5.0)
            await asyncio.to_thread(self.replay.close)

    # ------------------------------------------------------------------ input

    def on_message(self, message: paho.MQTTMessage) -> None:
        """paho's callback (on the event loop): hand the message to a task, never block here."""
        properties = getattr(message, "properties", None)
        topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        self.submit(bytes(message.payload), topic if isinstance(topic, str) else None,
                    bytes(correlation) if correlation is not None else None)

    def submit(self, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.dropped += 1
            log.warning("commands: %d commands in progress; dropped one (%d bytes) unanswered", len(self._tasks),
                        len(payload))
            return
        task = asyncio.create_task(self._run(payload, response_topic, correlation), name="command")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        try:
            await self.handle(payload, response_topic, correlation)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not kill the agent; it is answered as "internal" inside handle()
            log.exception("commands: unexpected error")

    async def handle(self, payload: bytes, response_topic: str | None = None,
                     correlation: bytes | None = None) -> Reply | None:
        """Check, run, audit and answer one command; returns the reply (None when suppressed)."""
        received = time.time()
        envelope: Envelope | None = None
        operator: Operator | None = None
        config = self.gateway.config
        try:
            envelope = await self._parse(payload)
            operator = verify(envelope, config, self.keyring, received)
            keep_until = envelope.expires_at + config.commands.clock_skew + REPLAY_MARGIN
            if not await asyncio.to_thread(self.replay.claim, envelope, keep_until, received):
                raise CommandError("replayed", f"command {envelope.id!r} was already received")
            spec = self._authorise(envelope, operator)
            result = await spec.run(Call(self.gateway, envelope, operator, self.keyring, self.config_lock))
            body = response(envelope.id, result=result)
        except CommandError as exc:
            echo = envelope.id if envelope else None if exc.code == "too_large" else echo_id(payload)
            body = response(echo, error=exc)
        except (TwinError, ModelError, ConfigError) as exc:
            body = response(envelope.id if envelope else None, error=CommandError("failed", str(exc)))
        except Exception as exc:
            log.exception("commands: bug while handling %s", envelope.name if envelope else "a command")
            body = response(envelope.id if envelope else None,
                            error=CommandError("internal", f"internal error: {type(exc).__name__}"))
        self.handled += 1
        if operator is None and not self._flood.try_take():
            self._suppressed += 1
            if self._suppressed == 1:
                log.warning("commands: flood of unauthenticated commands; answers and audit records suppressed")
            return None
        self._audit(envelope, operator, body, received)
        return await self._answer(body, response_topic, correlation)

    async def _parse(self, payload: bytes) -> Envelope:
        limit = self.gateway.config.commands.max_payload
        if len(payload) > 64 * 1024:  # a model update: decode off the event loop
            return await asyncio.to_thread(parse, payload, limit)
        return parse(payload, limit)

    def _authorise(self, envelope: Envelope, operator: Operator) -> Spec:
        spec = self.commands.get(envelope.name)
        if spec is None:
            raise CommandError("unknown_command", f'no command "{envelope.name}"; known: '
                                                  f'{", ".join(sorted(self.commands))}')
        if ROLES.index(operator.role) < ROLES.index(spec.role):
            raise CommandError("forbidden", f'"{envelope.name}" needs role {spec.role}; '
                                            f'"{operator.name}" is {operator.role}')
        unknown = sorted(set(envelope.args) - set(spec.required) - set(spec.optional))
        missing = [a for a in spec.required if a not in envelope.args]
        if unknown or missing:
            raise CommandError("bad_args", "; ".join(
                ([f"missing: {', '.join(missing)}"] if missing else [])
                + ([f"unknown: {', '.join(unknown)}"] if unknown else [])))
        return spec

    # ------------------------------------------------------------------ output

    def _audit(self, envelope: Envelope | None, operator: Operator | None, body: dict[str, Any],
               received: float) -> None:
        error = body.get("error") or {}
        who = operator.name if operator else f'unverified "{envelope.operator}"' if envelope else "unverified"
        what = envelope.name if envelope else "?"
        outcome = "ok" if body["ok"] else f"{error.get('code')}: {error.get('message')}"
        record: dict[str, Any] = {
            "ts": received, "source": "commands", "kind": "command", "state": "ok" if body["ok"] else error["code"],
            "message": f"{who}: {what}: {outcome}", "command_id": body["id"], "command": what,
            "operator": envelope.operator if envelope else None, "role": operator.role if operator else None,
            "ok": body["ok"], "code": None if body["ok"] else error.get("code"),
            "args": _summarise(envelope.args) if envelope else None, "duration_s": time.time() - received,
        }
        if self._suppressed and operator is None:
            record["suppressed_before"], self._suppressed = self._suppressed, 0
        log.log(logging.INFO if body["ok"] else logging.WARNING, "commands: %s", record["message"])
        self.gateway.record_event(record)

    async def _answer(self, body: dict[str, Any], topic: str | None, correlation: bytes | None) -> Reply:
        if topic is not None and not valid_topic(topic):
            log.warning("commands: response topic %r is not a topic name; answering on .../cmd/response", topic)
            topic = None
        reply = Reply(body, topic, correlation)
        payload = json.dumps(json_safe(body), ensure_ascii=False, default=str,
                             allow_nan=False).encode("utf-8", "backslashreplace")
        try:
            if not await self.gateway.respond(topic, payload, correlation):
                log.debug("commands: no MQTT link; response to %s not sent", body["id"])
        except TwinError as exc:
            log.error("%s; response to command %s lost", exc, body["id"])
        return reply


def _summarise(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as the audit keeps them: big values (config text, model bytes) as size and hash."""
    summary: dict[str, Any] = {}
    for key, value in list(args.items())[:20]:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > 200:
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            summary[key] = {"bytes": len(text), "sha256": digest}
        else:
            summary[key] = value
    return summary
