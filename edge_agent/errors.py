"""The project's one error tree.

Library errors (asyncua, pymodbus, sqlite3, ...) are caught where the library is called and
re-raised as one of these, so the rest of the agent handles a handful of types::

    EdgeAgentError
    ├── ConfigError          a config file that does not validate (carries every problem)
    ├── DriverError          anything a device driver reports
    │   ├── ConnectError     the device could not be reached or refused the session
    │   ├── ReadError        a read failed (timeout, exception response, bad node id)
    │   └── WriteError       a write was refused or could not be sent
    ├── TwinError            the SQLite twin (or the outbox beside it) could not be used
    └── ModelError           an ONNX model failed to load, broke its contract, or failed to run

Only the CLI turns these into exit codes and messages.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """A config file failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DriverError(EdgeAgentError):
    """A device driver failed; the message names the device."""


class ConnectError(DriverError):
    """The device could not be reached, or refused the connection or session."""


class ReadError(DriverError):
    """A read from the device failed."""


class WriteError(DriverError):
    """A write to the device failed or was refused by the device."""


class TwinError(EdgeAgentError):
    """The SQLite twin could not be opened, read or written."""


class ModelError(EdgeAgentError):
    """An ONNX model could not be loaded, does not fit its config, or failed to run."""
