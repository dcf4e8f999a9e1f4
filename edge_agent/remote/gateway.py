"""What remote commands may do to the gateway: the narrow face the agent shows them.

The command dispatcher and its handlers see a :class:`Gateway`, never the agent itself: no
driver, no twin connection, no task of the agent's, nothing they could use to get around the
safety gate or the outbox. :class:`edge_agent.agent.Agent` implements it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.control.gate import WriteResult
    from edge_agent.service.status import GatewayStatus
    from edge_agent.store.twin import DesiredClaim, DesiredDocument
    from edge_agent.store.views import TwinView

T = TypeVar("T")


class Gateway(Protocol):
    """The gateway as remote commands see it."""

    @property
    def config(self) -> AgentConfig:
        """The running config (read-only)."""
        ...

    def status(self) -> GatewayStatus:
        """A snapshot of the gateway's health."""
        ...

    def current(self) -> list[dict[str, Any]]:
        """Every configured point's latest value, quality, source time and unit (from memory)."""
        ...

    async def query(self, fn: Callable[[TwinView], T]) -> T:
        """Run ``fn`` on a view of the twin off the event loop (reads, and acknowledging events)."""
        ...

    async def request_write(self, point: str, value: Any, *, source: str, actor: str | None) -> WriteResult:
        """Ask the safety gate to write ``point``; returns its verdict."""
        ...

    def event_acked(self, event_id: int, operator: str) -> list[str]:
        """An operator acknowledged event ``event_id``: lift what it held (returns the points whose
        automatic writes resume)."""
        ...

    def data_ready(self, point: str) -> bool:
        """Whether the safety gate can judge a write to ``point`` on current data: its device has
        delivered data since it connected, or has failed to connect (False while it is still
        connecting, e.g. right after a start). True for a point that does not exist."""
        ...

    async def claim_desired(self, document: DesiredDocument) -> DesiredClaim:
        """Record a verified desired document as the last one handled, durably and before anything
        is written, when its version is greater than the last one's; its points' desired state
        becomes ``document.status``. TwinError when the twin cannot record it."""
        ...

    def optimizer_mode(self) -> str | None:
        """The optimiser's mode, or None when no optimiser is configured."""
        ...

    def set_optimizer_mode(self, mode: str, reason: str) -> None:
        ...

    def model_names(self) -> list[str]:
        ...

    async def swap_model(self, name: str, model: bytes, source: str) -> tuple[Path, tuple[str, ...]]:
        """Load, check and swap in a new version of model ``name`` (ModelError: the old one stays).

        Returns the model's configured file (where to persist it) and its inputs.
        """
        ...

    def needs_restart(self, new: AgentConfig) -> bool:
        """Whether ``new`` changes settings only a restart can apply (agent.*, twin.*)."""
        ...

    async def reload(self, new: AgentConfig) -> str:
        """Apply a new config in place; returns what changed."""
        ...

    async def restart_device(self, name: str) -> None:
        """Close a device's connection and start its supervisor afresh."""
        ...

    def record_event(self, event: dict[str, Any]) -> None:
        """Store an event in the twin and publish it (the audit trail)."""
        ...

    async def respond(self, topic: str | None, payload: bytes, correlation: bytes | None) -> bool:
        """Queue a command response in the outbox; False when there is no MQTT link to answer on."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task the agent cancels when it stops."""
        ...
