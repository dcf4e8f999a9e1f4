"""The operator's side of remote management: key pairs, and signing and sending one command.

``edge-agent keys new NAME [--dir DIR]`` writes ``NAME.key`` (Ed25519 private key, PKCS#8 PEM, mode
0600) and ``NAME.pub`` (the public key, PEM, for ``[[commands.operators]] public_key``).

``edge-agent command ... COMMAND [ARG=VALUE ...]`` builds the envelope, signs :func:`canonical`
bytes, publishes it to ``{prefix}/{site}/{id}/cmd`` with an MQTT 5 Response Topic (a fresh topic
under ``.../cmd/response/``) and Correlation Data (the command id), waits for the answer and prints
it as JSON. VALUE is parsed as JSON when it parses (``value=7.5`` is a number), else taken as a
string; ``key=@FILE`` reads a text file, ``key=b64@FILE`` a binary one as base64 (for
``update_model onnx=b64@model.onnx``, whose ``sha256`` is then computed when not given).

The CLI prints the answer; its exit status is 0 when the gateway answered ok, 1 when it answered
an error or did not answer in time (or the broker could not be reached), 2 for bad usage (a bad
ARG, an unreadable key).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.errors import LinkError, UsageError

# cryptography, paho and the command module are imported where they are used, so that building
# the CLI's argument parser (every `edge-agent` invocation) loads none of them
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

VALIDITY = 300  # seconds a command stays valid after it is signed


def add_parsers(sub: Any) -> None:
    """Add ``keys`` and ``command`` to the edge-agent CLI's subparsers."""
    keys = sub.add_parser("keys", help="operator key pairs for signed remote commands")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    new = keys_sub.add_parser("new", help="a new Ed25519 key pair: NAME.key (0600) and NAME.pub, PEM")
    new.add_argument("name", metavar="NAME", help="operator name, used for the file names")
    new.add_argument("--dir", default=".", help="where to write the files (default: the current directory)")

    cmd = sub.add_parser("command", help="sign and send a command to a gateway, print its answer as JSON")
    cmd.add_argument("--broker", required=True, help="HOST:PORT of the MQTT broker (TLS)")
    cmd.add_argument("--ca", required=True, help="CA certificate file that signed the broker's certificate")
    cmd.add_argument("--cert", required=True, help="our client certificate (PEM)")
    cmd.add_argument("--key", required=True, help="our client certificate's private key (PEM)")
    cmd.add_argument("--operator", required=True, help="operator name, as configured on the gateway")
    cmd.add_argument("--signing-key", required=True, help="the operator's Ed25519 private key (edge-agent keys new)")
    cmd.add_argument("--gateway", required=True, help="SITE/ID of the gateway, e.g. plant-a/gw-01")
    cmd.add_argument("--prefix", default="edge", help="topic prefix (default edge)")
    cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)")
    cmd.add_argument("name", metavar="COMMAND", help="ping, status, read, write, set_config, ...")
    cmd.add_argument("args", metavar="ARG=VALUE", nargs="*", help="arguments; VALUE is JSON or a string, @FILE "
                     "reads a text file, b64@FILE a binary file as base64")


# --------------------------------------------------------------------------- keys


def new_keys(name: str, directory: Path) -> tuple[Path, Path]:
    """Write a new key pair; returns (private key file, public key file). UsageError when it cannot."""
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"NAME: expected a plain name, got {name!r}")
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise UsageError(f"{path} exists; not overwriting a key")
    directory.mkdir(parents=True, exist_ok=True)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # created 0600 first, so the key is never readable by others, not even briefly
    os.close(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    private.write_bytes(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The operator's Ed25519 private key (PEM); UsageError when it cannot be used."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--signing-key {path}: cannot read the private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"--signing-key {path}: not an Ed25519 private key")
    return key


# --------------------------------------------------------------------------- commands


def parse_args(pairs: list[str]) -> dict[str, Any]:
    """``ARG=VALUE`` pairs: JSON when it parses, else a string; ``@FILE`` text, ``b64@FILE`` base64."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"argument {pair!r}: expected ARG=VALUE")
        args[key] = _value(key, value)
    return args


def _value(key: str, value: str) -> Any:
    for prefix, binary in (("b64@", True), ("@", False)):
        if value.startswith(prefix):
            path = Path(value[len(prefix):])
            try:
                data = path.read_bytes()
                return base64.b64encode(data).decode() if binary else data.decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"{key}: cannot read {path}: {exc}") from None
    try:
        return json.loads(value)
    except ValueError:
        return value


def sign(key: Ed25519PrivateKey, operator: str, name: str, args: dict[str, Any], *, now: float | None = None,
         validity: int = VALIDITY, command_id: str | None = None) -> dict[str, Any]:
    """A signed envelope, ready to publish as JSON."""
    issued = int(time.time() if now is None else now)
    envelope: dict[str, Any] = {"id": command_id or uuid.uuid4().hex, "name": name, "args": args,
                                "operator": operator, "issued_at": issued, "expires_at": issued + validity}
    from edge_agent.remote.envelope import canonical

    envelope["sig"] = base64.b64encode(key.sign(canonical(envelope))).decode()
    return envelope


def send(args: argparse.Namespace) -> dict[str, Any]:
    """Sign the command, publish it, return the gateway's answer. UsageError, or LinkError when no answer."""
    key = load_signing_key(Path(args.signing_key))
    host, sep, port = args.broker.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--broker: expected HOST:PORT, got {args.broker!r}")
    site, sep, gateway = args.gateway.partition("/")
    if not sep or not site or not gateway or "/" in gateway:
        raise UsageError(f"--gateway: expected SITE/ID, got {args.gateway!r}")
    command_args = parse_args(args.args)
    if args.name == "update_model" and "onnx" in command_args and "sha256" not in command_args:
        command_args["sha256"] = hashlib.sha256(base64.b64decode(command_args["onnx"])).hexdigest()
    envelope = sign(key, args.operator, args.name, command_args)
    base = f"{args.prefix}/{site}/{gateway}"
    # paho is imported only for this verb: `edge-agent --help`, keys and the daemon's own
    # commands do not need it loaded
    from edge_agent.remote.exchange import Exchange

    exchange = Exchange(host, int(port), ca=args.ca, cert=args.cert, key=args.key)
    try:
        answer = exchange.request(f"{base}/cmd", f"{base}/cmd/response/{uuid.uuid4().hex}", envelope,
                                  timeout=args.timeout)
    except (OSError, TimeoutError) as exc:
        raise LinkError(str(exc)) from exc
    return answer
