"""A server's operation limits, and requests split to fit them (OPC 10000-5 §6.3.11, OperationLimits).

Servers cap how many nodes one service call may carry (a Siemens S7-1500 takes 1000 per Read,
many embedded servers far fewer) and answer a bigger request with BadTooManyOperations, which
failed every point at once in peers' clients (Telegraf #19609, #19662; ThingsBoard IoT Gateway
#1987). At connect the driver reads ``Server/ServerCapabilities/OperationLimits``
(:func:`read_limits`): MaxNodesPerRead and MaxMonitoredItemsPerCall (which caps deletes too; the
driver writes one node per request, which fits any MaxNodesPerWrite); a missing node or 0 means
no limit. :func:`batched` then sends a list of operations as as few requests as
the limit allows. A server that refuses a request with BadTooManyOperations anyway (it advertises
no limit, or a wrong one) gets the same operations again in halves, and the smaller size is kept
for the rest of the session.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from asyncua import Client, ua

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# The limits the driver needs, by the service they cap.
_NODES = {
    "read": ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
    "monitor": ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
}


@dataclass(slots=True)
class OperationLimits:
    """Most operations per request, by service; 0 means no limit."""

    read: int = 0
    monitor: int = 0

    def describe(self) -> str:
        """``read 100, monitor none`` for log lines."""
        return ", ".join(f"{kind} {getattr(self, kind) or 'none'}" for kind in _NODES)


async def read_limits(client: Client, errors: tuple[type[BaseException], ...]) -> OperationLimits:
    """The server's limits, read in one request (two nodes fit any limit); none when it has no such nodes."""
    nodes = [client.get_node(ua.NodeId(ua.Int32(node_id))) for node_id in _NODES.values()]
    limits = OperationLimits()
    try:
        values = await client.read_attributes(nodes, ua.AttributeIds.Value)
    except errors as exc:  # an old or minimal server: treat as no limits, and find out by halving
        logger.debug("cannot read the server's OperationLimits: %r", exc)
        return limits
    for kind, data in zip(_NODES, values, strict=True):
        value = data.Value.Value if data.Value is not None else None
        if (data.StatusCode is None or data.StatusCode.is_good()) and isinstance(value, int) and value > 0:
            setattr(limits, kind, int(value))
    return limits


async def batched(call: Callable[[Sequence[T]], Awaitable[Sequence[R]]], items: Sequence[T],
                  limits: OperationLimits, kind: str, where: Any = "") -> list[R]:
    """``call`` on consecutive slices of ``items`` no longer than the ``kind`` limit; the results in order.

    A slice refused with BadTooManyOperations is tried again in halves (down to one item); the
    smaller size is kept in ``limits``. Other errors propagate.
    """
    results: list[R] = []
    start, total = 0, len(items)
    while start < total:
        size = getattr(limits, kind) or total
        chunk = items if start == 0 and size >= total else items[start:start + size]
        try:
            results.extend(await call(chunk))
        except ua.uaerrors.BadTooManyOperations:
            if len(chunk) == 1:
                raise
            smaller = max(1, len(chunk) // 2)
            logger.warning("%s: the server refused %d %s operations in one request (BadTooManyOperations); "
                           "sending at most %d per request from now on", where, len(chunk), kind, smaller)
            setattr(limits, kind, smaller)
            continue
        start += len(chunk)
    return results
