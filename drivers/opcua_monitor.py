"""The monitored items of one OPC UA subscription: one per point, kept complete.

Items are created in requests that fit the server's MaxMonitoredItemsPerCall
(:mod:`drivers.opcua_limits`), the point's index as client handle. An item the server refuses
(its node unknown, a BadTooManyMonitoredItems...) or reports lost (a BadNodeIdUnknown
notification: the node was deleted) leaves only its point bad: :class:`MonitoredItems` drops it
and creates it again when :meth:`MonitoredItems.retry` is due, with a backoff from the device's
``retry_min`` doubling to ``retry_max``, until the server takes it. One missing node therefore
never fails the subscription, nor stops it from coming back (Telegraf #19186).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence

from asyncua import Node, ua
from asyncua.common.subscription import Subscription

from drivers.base import BAD, Reading, ReadingSink
from drivers.opcua_limits import OperationLimits, batched
from edge_agent.config import OpcUaDevice
from edge_agent.errors import ReadError

logger = logging.getLogger(__name__)


def monitor_request(handle: int, node: Node, interval_ms: float) -> ua.MonitoredItemCreateRequest:
    """Data changes of the node's Value, sampled at the publishing interval, the latest value only."""
    request = ua.MonitoredItemCreateRequest()
    request.ItemToMonitor = ua.ReadValueId(NodeId=node.nodeid, AttributeId=ua.AttributeIds.Value)
    request.MonitoringMode = ua.MonitoringMode.Reporting
    request.RequestedParameters = ua.MonitoringParameters(
        ClientHandle=handle, SamplingInterval=interval_ms, QueueSize=1, DiscardOldest=True)
    return request


class MonitoredItems:
    """The items of one subscription, by handle (the point's index in the device's points)."""

    def __init__(self, device: OpcUaDevice, nodes: Sequence[Node], limits: OperationLimits,
                 errors: tuple[type[BaseException], ...]) -> None:
        self.device = device
        self.nodes = nodes
        self.limits = limits
        self.errors = errors  # what the client library raises when the link or the server fails
        self.names = [p.name for p in device.points]
        self.ids: dict[int, int] = {}  # handle -> the server's MonitoredItemId
        self.missing: dict[int, str] = {}  # handle -> why it has no item (a status name)
        self._delay = device.retry_min
        self._due = math.inf

    async def create(self, subscription: Subscription, handles: Iterable[int]) -> dict[int, ua.StatusCode]:
        """Create the items for ``handles``; returns the ones the server refused. ReadError on link failure."""
        handles = list(handles)
        interval_ms = self.device.interval * 1000.0
        requests = [monitor_request(handle, self.nodes[handle], interval_ms) for handle in handles]
        try:
            results = await batched(subscription.create_monitored_items, requests, self.limits, "monitor",
                                    self.device.name)
        except self.errors as exc:
            raise ReadError(self.device.name, f"cannot monitor the points: {_describe(exc)}") from exc
        refused: dict[int, ua.StatusCode] = {}
        for handle, result in zip(handles, results, strict=True):
            if isinstance(result, ua.StatusCode):
                refused[handle] = result
            else:
                self.ids[handle] = result
        return refused

    def refused(self, refused: dict[int, ua.StatusCode], sink: ReadingSink) -> None:
        """Points the server would not monitor: bad now, tried again later."""
        now = time.time()
        sink([Reading(self.names[handle], None, BAD, now) for handle in refused])
        logger.warning("%s: the server refused to monitor %d point(s): %s; they read bad and are tried again "
                       "from %g s to every %g s", self.device.name, len(refused),
                       ", ".join(f"{self.names[h]} ({status.name})" for h, status in refused.items()),
                       self.device.retry_min, self.device.retry_max)
        self._schedule({handle: status.name for handle, status in refused.items()})

    async def forget(self, subscription: Subscription, handles: Iterable[int]) -> list[str]:
        """Drop the items of nodes the server no longer knows; returns their points' names."""
        handles = sorted(handles)
        ids = [self.ids.pop(handle) for handle in handles if handle in self.ids]
        for handle in handles:
            logger.warning("%s: point %s: the server no longer knows node %s; point bad, monitoring it again "
                           "from %g s to every %g s", self.device.name, self.names[handle],
                           self.device.points[handle].node, self.device.retry_min, self.device.retry_max)
        if ids:

            async def delete(chunk: Sequence[int]) -> list[None]:
                await subscription.unsubscribe(list(chunk))
                return [None] * len(chunk)

            try:
                await batched(delete, ids, self.limits, "monitor", self.device.name)
            except self.errors as exc:  # the item may be gone with its node; nothing is lost
                logger.debug("%s: deleting monitored items %s: %s", self.device.name, ids, _describe(exc))
        self._schedule(dict.fromkeys(handles, "BadNodeIdUnknown"))
        return [self.names[handle] for handle in handles]

    def due(self) -> bool:
        """True when missing items wait and their retry time has come."""
        return bool(self.missing) and time.monotonic() >= self._due

    async def retry(self, subscription: Subscription) -> None:
        """Try to create the missing items again; the ones still refused wait twice as long."""
        handles = sorted(self.missing)
        refused = await self.create(subscription, handles)
        for handle in handles:
            if handle not in refused:
                del self.missing[handle]
                logger.info("%s: point %s: monitoring node %s again", self.device.name, self.names[handle],
                            self.device.points[handle].node)
        self.missing.update({handle: status.name for handle, status in refused.items()})
        if self.missing:
            self._delay = min(self._delay * 2, self.device.retry_max)
            self._due = time.monotonic() + self._delay
            logger.debug("%s: %d point(s) still not monitored; next try in %g s", self.device.name,
                         len(self.missing), self._delay)
        else:
            self._due = math.inf

    def _schedule(self, failed: dict[int, str]) -> None:
        if not self.missing:
            self._delay = self.device.retry_min
        self.missing.update(failed)
        self._due = min(self._due, time.monotonic() + self._delay)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
