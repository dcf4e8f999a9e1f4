"""The command envelope on the wire: parsing, the signed bytes, the Ed25519 check, the answer's shape.

A command arrives as one JSON object ``{"id", "name", "args", "operator", "issued_at",
"expires_at", "sig"}``. ``sig`` is the base64 Ed25519 signature of :func:`canonical` (the UTF-8
bytes of ``json.dumps(every field but sig, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``), checked against the operator's public key. :func:`parse` checks the
shape, :func:`verify` the operator, the signature and the validity window; the codes they
raise are listed in :mod:`edge_agent.remote.dispatch`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.config import AgentConfig, Operator
from edge_agent.errors import CommandError

log = logging.getLogger(__name__)

FIELDS = ("id", "name", "args", "operator", "issued_at", "expires_at", "sig")
MAX_ID = 128  # characters of a command id
# JSON strings and structure (",", ":", "[", "{") outside strings a command may have. A command has
# a few dozen; a whole config or model travels as one string. json.loads holds the GIL for its
# whole run and pays per value (3 MB of small values: 85 ms), so more than this is refused unread.
MAX_STRINGS = 10_000
MAX_TOKENS = 20_000
SHORT = 64  # characters of a field echoed in an error message


def short(text: Any, limit: int = SHORT) -> str:
    """At most ``limit`` characters of ``text``, control characters escaped, "..." when cut: what an
    error message or a log line may echo of a field nobody has vouched for yet."""
    value = text if isinstance(text, str) else repr(text)
    cut = value[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    return cut + ("..." if len(value) > limit else "")


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
    signed: bytes = field(default=b"", repr=False)  # canonical(raw), computed once by parse()
    size: int = 0  # bytes on the wire


class EnvelopeError(CommandError):
    """A refusal from :func:`parse`; ``echo`` is the request's id when it could be read."""

    def __init__(self, code: str, message: str, echo: str | None = None) -> None:
        super().__init__(code, message)
        self.echo = echo


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _structure(payload: bytes) -> str | None:
    """Why ``payload`` has too many JSON values to be worth parsing (None: it has few enough).

    Counted with a handful of bytes operations (a few ms for 4 MB), never by parsing: escaped
    backslashes and quotes go first, then every quote left delimits a string.
    """
    plain = payload.replace(b"\\\\", b"").replace(b'\\"', b"")
    quotes = plain.count(b'"')
    if quotes > 2 * MAX_STRINGS:
        return f"more than {MAX_STRINGS} strings"
    outside = plain.split(b'"')[::2]  # the text between strings
    tokens = sum(part.count(b",") + part.count(b":") + part.count(b"[") + part.count(b"{") for part in outside)
    if tokens > MAX_TOKENS:
        return f"more than {MAX_TOKENS} values"
    return None


def parse(payload: bytes, max_payload: int) -> Envelope:
    """Decode and type-check an envelope; CommandError (too_large, bad_json, missing_field, bad_field).

    The refusals are :class:`EnvelopeError`, with the request's id when it could be read. Large
    payloads belong in a worker thread: parsing and re-serialising 4 MB takes about 15 ms.
    """
    if len(payload) > max_payload:
        raise EnvelopeError("too_large", f"payload of {len(payload)} bytes is over the limit of {max_payload}")
    if len(payload) > 4096:
        crowded = _structure(payload)
        if crowded is not None:
            raise EnvelopeError("bad_json", f"not a command: {crowded}")
    try:
        doc = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeError, ValueError, RecursionError) as exc:
        raise EnvelopeError("bad_json", f"not a JSON document: {short(str(exc), 200)}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("bad_json", f"expected a JSON object, got {type(doc).__name__}")
    echo = _echo(doc.get("id"))
    try:
        signed = canonical(doc)
    except UnicodeError as exc:  # lone surrogates cannot be signed: refused here
        raise EnvelopeError("bad_json", f"not a JSON document: {short(str(exc), 200)}", echo) from None
    try:
        return _typed(doc, signed, len(payload))
    except CommandError as exc:
        raise EnvelopeError(exc.code, exc.message, echo) from None


def _echo(value: Any) -> str | None:
    """The request's id as an answer may repeat it: a string of at most MAX_ID characters, UTF-8 clean."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        return None
    try:
        value.encode("utf-8")
    except UnicodeError:
        return None
    return value


def _typed(doc: dict[str, Any], signed: bytes, size: int) -> Envelope:
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
    if len(doc["sig"]) > 100:  # 64 bytes are 88 characters of base64
        raise CommandError("bad_field", f"sig: expected a 64-byte Ed25519 signature, got {len(doc['sig'])} characters")
    try:
        sig = base64.b64decode(doc["sig"], validate=True)
    except (binascii.Error, ValueError):
        raise CommandError("bad_field", "sig: expected base64") from None
    if len(sig) != 64:
        raise CommandError("bad_field", f"sig: expected a 64-byte Ed25519 signature, got {len(sig)} bytes")
    return Envelope(doc["id"], doc["name"], doc["args"], doc["operator"], float(doc["issued_at"]),
                    float(doc["expires_at"]), sig, doc, signed, size)


def finite(value: int | float) -> bool:
    """A number that is a finite float (a huge JSON integer is not: float() overflows)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


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
        raise CommandError("unknown_operator", f'no operator "{short(envelope.operator)}" on this gateway')
    try:
        keyring.key(operator).verify(envelope.sig, envelope.signed or canonical(envelope.raw))
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


def valid_topic(topic: str) -> bool:
    """A topic name we may publish to: non-empty, no wildcards or NUL, at most 65535 UTF-8 bytes."""
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeError:
        return False
    return 0 < size <= 65535 and not any(c in topic for c in "+#\0")
