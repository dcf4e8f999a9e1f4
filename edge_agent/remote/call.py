"""One authorised command being run: its arguments, checked, and what the handlers may use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.config import Operator
from edge_agent.config.table import parse_duration
from edge_agent.errors import CommandError
from edge_agent.remote.envelope import Envelope, Keyring, finite
from edge_agent.remote.gateway import Gateway

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
    """One authorised command being run: the gateway's narrow face, who sent it, and its arguments."""

    gateway: Gateway
    envelope: Envelope
    operator: Operator
    keyring: Keyring  # to check that a pushed config leaves an admin whose key loads
    config_lock: asyncio.Lock  # one config change at a time

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


