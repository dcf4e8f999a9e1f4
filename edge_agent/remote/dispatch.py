"""Remote management: signed commands over MQTT, checked, authorised, executed and audited.

A command arrives on ``{topic_prefix}/{site}/{gateway_id}/cmd`` as one JSON object::

    {"id", "name", "args": {...}, "operator", "issued_at", "expires_at", "sig"}

``sig`` is the base64 Ed25519 signature of :func:`canonical` (the UTF-8 bytes of
``json.dumps(every field but sig, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``),
checked against the operator's public key from ``[[commands.operators]]``. Checks run in this
order and the first failure answers with its error code:

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
Topic with its Correlation Data when present, else to ``.../cmd/response``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent import __version__
from edge_agent.config import ROLES, AgentConfig, Operator
from edge_agent.config.table import parse_duration
from edge_agent.errors import ConfigError, EdgeAgentError, ModelError, TwinError
from edge_agent.pacing import TokenBucket
from edge_agent.service import status as health
from edge_agent.store.twin import Twin

if TYPE_CHECKING:
    import paho.mqtt.client as paho

    from edge_agent.agent import Agent

log = logging.getLogger(__name__)

FIELDS = ("id", "name", "args", "operator", "issued_at", "expires_at", "sig")
MAX_ID = 128  # characters of a command id
MAX_IN_FLIGHT = 32  # commands handled at once; more are dropped (logged)
REPLAY_MARGIN = 86400.0  # ids are kept this long after expires_at + clock_skew
REPLAY_FILE = "commands.db"


class CommandError(EdgeAgentError):
    """A command refused or failed: ``code`` is one of the stable codes in the module docstring."""

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


def canonical(envelope: dict[str, Any]) -> bytes:
    """The bytes an operator signs: every field but ``sig``, sorted, compact, UTF-8."""
    body = {k: v for k, v in envelope.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def response(command_id: Any, *, result: Any = None, error: CommandError | None = None) -> dict[str, Any]:
    """The response body: ``{"v":1,"id","ok":true,"result"}`` or ``{"v":1,"id","ok":false,"error"}``."""
    if error is None:
        return {"v": 1, "id": command_id, "ok": True, "result": result}
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.detail is not None:
        body["detail"] = error.detail
    return {"v": 1, "id": command_id, "ok": False, "error": body}


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True)
class Envelope:
    """A parsed, well-typed command (not yet verified)."""

    id: str
    name: str
    args: dict[str, Any]
    operator: str
    issued_at: float
    expires_at: float
    sig: bytes
    raw: dict[str, Any] = field(repr=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse(payload: bytes, max_payload: int) -> Envelope:
    """Decode and type-check an envelope; CommandError (too_large, bad_json, missing_field, bad_field)."""
    if len(payload) > max_payload:
        raise CommandError("too_large", f"payload of {len(payload)} bytes is over the limit of {max_payload}")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
        canonical(doc if isinstance(doc, dict) else {})  # lone surrogates cannot be signed: refuse them here
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise CommandError("bad_json", f"not a JSON document: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError("bad_json", f"expected a JSON object, got {type(doc).__name__}")
    missing = [f for f in FIELDS if f not in doc]
    if missing:
        raise CommandError("missing_field", f"missing field(s): {', '.join(missing)}")
    for name in ("id", "name", "operator", "sig"):
        if not isinstance(doc[name], str) or not doc[name]:
            raise CommandError("bad_field", f"{name}: expected a non-empty string")
    if len(doc["id"]) > MAX_ID:
        raise CommandError("bad_field", f"id: expected at most {MAX_ID} characters")
    if not isinstance(doc["args"], dict):
        raise CommandError("bad_field", "args: expected an object")
    for name in ("issued_at", "expires_at"):
        value = doc[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
            raise CommandError("bad_field", f"{name}: expected unix seconds (a number)")
    try:
        sig = base64.b64decode(doc["sig"], validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_field", "sig: expected base64") from None
    if len(sig) != 64:
        raise CommandError("bad_field", f"sig: expected a 64-byte Ed25519 signature, got {len(sig)} bytes")
    return Envelope(doc["id"], doc["name"], doc["args"], doc["operator"], float(doc["issued_at"]),
                    float(doc["expires_at"]), sig, doc)


def finite(value: int | float) -> bool:
    """A number that is a finite float (a huge JSON integer is not: float() overflows)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _echo_id(payload: bytes) -> str | None:
    """The request's id when it can be read at all, to correlate an early rejection."""
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
        value = doc.get("id") if isinstance(doc, dict) else None
        if isinstance(value, str) and len(value) <= MAX_ID:
            value.encode("utf-8")
            return value
    except (UnicodeError, ValueError, RecursionError):
        pass
    return None


class Keyring:
    """Operators' public keys, read on first use and again when the file changes."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[int, Ed25519PublicKey]] = {}

    def key(self, operator: Operator) -> Ed25519PublicKey:
        """The operator's key; CommandError(unknown_operator) when it cannot be read."""
        try:
            stamp = operator.public_key.stat().st_mtime_ns
            cached = self._cache.get(operator.public_key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            key = serialization.load_pem_public_key(operator.public_key.read_bytes())
        except (OSError, ValueError) as exc:
            log.error('commands: operator "%s": cannot read public key %s: %s', operator.name,
                      operator.public_key, exc)
            raise CommandError("unknown_operator", f'operator "{operator.name}" has no usable public key') from None
        if not isinstance(key, Ed25519PublicKey):
            log.error('commands: operator "%s": %s is not an Ed25519 key', operator.name, operator.public_key)
            raise CommandError("unknown_operator", f'operator "{operator.name}" has no usable public key')
        self._cache[operator.public_key] = (stamp, key)
        return key


def verify(envelope: Envelope, config: AgentConfig, keyring: Keyring, now: float) -> Operator:
    """Operator, signature, validity window; returns the operator or raises CommandError."""
    settings = config.commands
    if not settings.enabled:  # turned off by a reload since the link subscribed
        raise CommandError("unavailable", "remote commands are disabled on this gateway")
    operator = next((o for o in settings.operators if o.name == envelope.operator), None)
    if operator is None:
        raise CommandError("unknown_operator", f'no operator "{envelope.operator}" on this gateway')
    try:
        keyring.key(operator).verify(envelope.sig, canonical(envelope.raw))
    except InvalidSignature:
        raise CommandError("bad_signature", f'signature does not verify with the key of "{operator.name}"') from None
    if envelope.expires_at <= envelope.issued_at or envelope.expires_at - envelope.issued_at > settings.max_validity:
        raise CommandError("bad_validity", f"expires_at must be after issued_at and at most "
                                           f"{settings.max_validity:g} s later")
    if envelope.issued_at > now + settings.clock_skew:
        raise CommandError("not_yet_valid", f"issued {envelope.issued_at - now:.0f} s in the future (allowed "
                                            f"clock skew {settings.clock_skew:g} s)")
    if envelope.expires_at < now - settings.clock_skew:
        raise CommandError("expired", f"expired {now - envelope.expires_at:.0f} s ago")
    return operator


# --------------------------------------------------------------------------- replay store


class ReplayStore:
    """Ids of accepted commands, in ``data_dir/commands.db``, kept past their expiry across restarts.

    An id is claimed (committed) before its command runs, so a crash mid-command cannot make
    it usable again. Ids are removed ``REPLAY_MARGIN`` s after they could no longer pass the
    expiry check anyway. Thread-safe; call from a worker thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._claims = 0
        self._conn: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, operator TEXT NOT NULL, "
                             "name TEXT NOT NULL, expires_at REAL NOT NULL, received REAL NOT NULL)")
            except (sqlite3.Error, OSError) as exc:
                raise TwinError(f"{self.path}: cannot open the command replay store: {exc}") from exc
            self._conn = conn
        return self._conn

    def claim(self, envelope: Envelope, keep_until: float, now: float) -> bool:
        """Record the id; False when it was seen before. A store that cannot be written refuses (TwinError)."""
        with self._lock:
            conn = self._open()
            try:
                cur = conn.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?, ?)",
                                        (envelope.id, envelope.operator, envelope.name, keep_until, now))
                self._claims += 1
                if self._claims % 100 == 1:
                    conn.execute("DELETE FROM seen WHERE expires_at < ?", (now,))
            except sqlite3.Error as exc:
                raise TwinError(f"{self.path}: cannot record command {envelope.id!r}: {exc}") from exc
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None


class TwinReader:
    """A connection of our own to the twin file for command queries and acks (thread-safe).

    The agent's connection belongs to its writer; sharing it across threads would let a query
    run inside, or an ack join, the writer's transaction.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._twin: Twin | None = None

    def call(self, path: Path, fn: Callable[[Twin], Any]) -> Any:
        with self._lock:
            if self._twin is None or self._twin.path != path:
                self.close_locked()
                try:
                    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                    conn.execute("PRAGMA busy_timeout = 5000")
                except sqlite3.Error as exc:
                    raise TwinError(f"{path}: cannot open the twin: {exc}") from exc
                self._twin = Twin(conn, path)
            return fn(self._twin)

    def close_locked(self) -> None:
        if self._twin is not None:
            self._twin.close()
            self._twin = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


def ack_event(twin: Twin, event_id: int, operator: str, now: float) -> dict[str, Any]:
    """Mark an event acknowledged (first ack wins); CommandError(bad_args) for an unknown id."""
    try:
        with twin.transaction() as conn:
            row = conn.execute("SELECT acked_by, acked_ts FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None:
                raise CommandError("bad_args", f"event: no event {event_id}")
            already = row[0] is not None
            if not already:
                conn.execute("UPDATE events SET acked_by = ?, acked_ts = ? WHERE id = ?", (operator, now, event_id))
                row = (operator, now)
    except sqlite3.Error as exc:
        raise TwinError(f"{twin.path}: cannot acknowledge event {event_id}: {exc}") from exc
    return {"event": event_id, "acked_by": row[0], "acked_ts": row[1], "already_acked": already}


# --------------------------------------------------------------------------- handling


@dataclass(frozen=True)
class Reply:
    """What was answered: the body, where it went, and the correlation data echoed."""

    body: dict[str, Any]
    topic: str | None
    correlation: bytes | None


Handler = Callable[["Call"], Awaitable[Any]]


@dataclass(frozen=True)
class Spec:
    """A command: the lowest role allowed, its arguments, and the coroutine that runs it."""

    role: str
    run: Handler
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


@dataclass
class Call:
    """One authorised command being run."""

    handler: CommandHandler
    envelope: Envelope
    operator: Operator

    @property
    def agent(self) -> Agent:
        return self.handler.agent

    @property
    def args(self) -> dict[str, Any]:
        return self.envelope.args

    def arg(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.args.get(name, default)
        if value is None and default is None and name not in self.args:
            return None
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise CommandError("bad_args", f"{name}: expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise CommandError("bad_args", f"{name}: expected {_kind_name(kind)}, got {type(value).__name__}")
        return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


class CommandHandler:
    """Receives commands for one agent; created by the agent when ``[commands] enabled``."""

    def __init__(self, agent: Agent, *, flood_rate: float = 1.0, flood_burst: float = 60.0) -> None:
        from edge_agent.remote.handlers import COMMANDS  # the handlers import this module

        self.agent = agent
        self.keyring = Keyring()
        self.replay = ReplayStore(agent.config.agent.data_dir / REPLAY_FILE)
        self.reader = TwinReader()
        self.commands: dict[str, Spec] = COMMANDS
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
            self._guard = self.agent._spawn(self._guarding(), "commands")

    async def _guarding(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5.0)
            await asyncio.to_thread(self.reader.close)
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
        try:
            envelope = await self._parse(payload)
            operator = verify(envelope, self.agent.config, self.keyring, received)
            keep_until = envelope.expires_at + self.agent.config.commands.clock_skew + REPLAY_MARGIN
            if not await asyncio.to_thread(self.replay.claim, envelope, keep_until, received):
                raise CommandError("replayed", f"command {envelope.id!r} was already received")
            spec = self._authorise(envelope, operator)
            result = await spec.run(Call(self, envelope, operator))
            body = response(envelope.id, result=result)
        except CommandError as exc:
            echo = envelope.id if envelope else None if exc.code == "too_large" else _echo_id(payload)
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
        limit = self.agent.config.commands.max_payload
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
        self.agent.record_event(record)

    async def _answer(self, body: dict[str, Any], topic: str | None, correlation: bytes | None) -> Reply:
        if topic is not None and not valid_topic(topic):
            log.warning("commands: response topic %r is not a topic name; answering on .../cmd/response", topic)
            topic = None
        reply = Reply(body, topic, correlation)
        sync = self.agent.sync
        if sync is None:
            log.debug("commands: no MQTT link; response to %s not sent", body["id"])
            return reply
        payload = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace")
        try:
            await sync.append([sync.response(topic, payload, correlation)])
        except TwinError as exc:
            log.error("%s; response to command %s lost", exc, body["id"])
        return reply


def valid_topic(topic: str) -> bool:
    """A topic name we may publish to: non-empty, no wildcards or NUL, at most 65535 UTF-8 bytes."""
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeError:
        return False
    return 0 < size <= 65535 and not any(c in topic for c in "+#\0")


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


def atomic_write(path: Path, data: bytes, *, backup: Path | None = None) -> None:
    """Replace ``path`` atomically (temp file, fsync, rename); copy the old one to ``backup`` first."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if backup is not None and path.exists():
        backup_tmp = backup.with_name(f".{backup.name}.tmp")
        backup_tmp.write_bytes(path.read_bytes())
        os.replace(backup_tmp, backup)
    with contextlib.suppress(OSError):
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    os.replace(tmp, path)


def since_arg(call: Call, default: str) -> float:
    """``since`` as unix seconds (a number) or a duration back from now ("10m")."""
    value = call.arg("since", (int, float, str), default)
    if isinstance(value, int | float) and not finite(value):
        raise CommandError("bad_args", "since: expected unix seconds or a duration")
    if isinstance(value, str):
        try:
            return time.time() - parse_duration(value)
        except ValueError:
            raise CommandError("bad_args", f'since: expected unix seconds or a duration like "10m", '
                                           f'got "{value}"') from None
    return float(value)


def limit_arg(call: Call, default: int, most: int) -> int:
    value = call.arg("limit", int, default)
    if not 1 <= value <= most:
        raise CommandError("bad_args", f"limit: expected 1..{most}, got {value}")
    return int(value)


def status(agent: Agent) -> dict[str, Any]:
    """health.snapshot plus the optimiser's mode."""
    snap = health.snapshot(agent)
    snap["optimizer"] = {"mode": agent.optimizer.mode} if agent.optimizer is not None else None
    snap["version"] = __version__
    return snap

