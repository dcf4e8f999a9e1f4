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


def echo_id(payload: bytes) -> str | None:
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


def valid_topic(topic: str) -> bool:
    """A topic name we may publish to: non-empty, no wildcards or NUL, at most 65535 UTF-8 bytes."""
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeError:
        return False
    return 0 < size <= 65535 and not any(c in topic for c in "+#\0")
