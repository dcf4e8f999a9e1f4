"""The project's one error tree.

Library errors (asyncua, pymodbus, paho, sqlite3, onnxruntime, ...) are caught where the library
is called and re-raised as one of these, so the rest of the agent handles a handful of types::

    EdgeAgentError
    ├── ConfigError          a config file that does not validate (carries every problem)
    ├── DriverError          anything a device driver reports; names the device (and point)
    │   ├── ConnectError     the device could not be reached or refused the session
    │   ├── ReadError        a read failed (timeout, exception response, bad node id)
    │   └── WriteError       a write was refused or could not be sent
    ├── TwinError            a SQLite file of the agent (twin, outbox, replay store) could not be used
    ├── ModelError           an ONNX model failed to load, broke its contract, or failed to run
    ├── LinkError            the MQTT link is down or refused an operation
    ├── CommandError         a remote command refused or failed; ``code`` is a stable error code
    └── UsageError           a bad argument on the command line

Messages carry their context in one shape, the thing first, then what happened::

    device "pump1": cannot connect to 10.0.0.7:502 (refused, ...)
    device "pump1", point "pump1.flow": 70000 is out of range for uint16
    model "chiller-health": cannot load /opt/edge-agent/models/chiller_anomaly.onnx: ...
    /var/lib/edge-agent/twin.db: cannot store readings: database or disk is full

Only the CLI (:mod:`edge_agent.cli`) turns these into exit codes and messages.
"""

from __future__ import annotations

from typing import Any


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """A config file failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def where(device: str, point: str | None = None) -> str:
    """The context prefix of a device error: ``device "pump1"`` or ``device "pump1", point "x"``."""
    text = f'device "{device}"'
    return f'{text}, point "{point}"' if point else text


class DriverError(EdgeAgentError):
    """A device driver failed. ``device`` (and ``point``, when one is involved) are kept apart from
    ``reason`` for code that needs them; the message is ``device "NAME"[, point "P"]: reason``."""

    def __init__(self, device: str, reason: str, *, point: str | None = None) -> None:
        self.device = device
        self.point = point
        self.reason = reason
        super().__init__(f"{where(device, point)}: {reason}")


class ConnectError(DriverError):
    """The device could not be reached, or refused the connection or session."""


class ReadError(DriverError):
    """A read from the device failed."""


class WriteError(DriverError):
    """A write to the device failed or was refused by the device."""


class TwinError(EdgeAgentError):
    """A SQLite file of the agent (the twin, the outbox, the replay store) could not be opened, read or
    written; the message starts with the file's path."""


class ModelError(EdgeAgentError):
    """An ONNX model could not be loaded, does not fit its config, or failed to run."""


class LinkError(EdgeAgentError):
    """The MQTT link is down or refused an operation."""


class CommandError(EdgeAgentError):
    """A remote command refused or failed: ``code`` is one of the stable codes of
    :mod:`edge_agent.remote.dispatch`, ``detail`` optional JSON-able data for the response."""

    def __init__(self, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class UsageError(EdgeAgentError):
    """A bad argument on the command line (exit status 2)."""
