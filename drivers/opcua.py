"""OPC UA driver (asyncua 2.1): data-change subscriptions or batched polling, typed writes.

Connecting
    One asyncua ``Client`` per device, ``device.timeout`` per request. ``nsu=<uri>;...`` node
    ids are resolved against the server's NamespaceArray at connect; an unknown URI is a
    ConnectError naming the point. Node ids that do not exist are not checked at connect:
    the server answers them with a Bad status and the point reads as quality "bad". The
    server's OperationLimits are read at connect and every Read and CreateMonitoredItems is
    split to fit them (:mod:`drivers.opcua_limits`); a write carries one node and always fits.

Security
    ``security = "Basic256Sha256,Sign"`` or ``"...,SignAndEncrypt"`` uses the agent's
    application instance certificate (:mod:`drivers.opcua_pki`, under ``data_dir/pki``).
    Server certificate trust: before the secure channel is opened, the certificate the server
    presents on its matching endpoint (GetEndpoints) is compared with the one expected of it,
    the pinned ``devices[].server_certificate`` or else the one trusted on first use
    (``data_dir/pki/trusted/``). Another certificate is refused with a ConnectError that names
    both and how to accept the new one, so the device goes down loudly (log, event, status) and
    no password is ever encrypted to a stranger's key. The expected certificate, not the one
    presented, is then given to asyncua, which checks it again in CreateSession.

Subscribe mode
    One subscription (publishing interval = ``device.interval``) with a monitored item per
    point on its Value. asyncua 2.1 hands every notification to a handler in its own task
    (``Subscription._deliver``), which costs more than decoding it; so the driver subclasses
    ``Subscription`` and turns each publish response into one batch of readings, one sink call.

Recovery
    ``check`` (every interval) raises ReadError, and the device supervisor reconnects with
    backoff and subscribes afresh, when: the client's watchdog saw the connection die (server
    stopped or restarted), the server closed the session, the server reported the subscription
    gone (a StatusChangeNotification), or no publish response came for too long. Any publish
    response counts, data as well as keep-alive: a busy subscription sends no keep-alives
    (OPC 10000-4 §5.13.1; HiveMQ Edge #1303). The keep-alive period is ten publishing
    intervals, 1 to 5 s. After one and a half keep-alive periods of silence the driver asks
    the server whether the subscription still exists (SetPublishingMode), so a subscription the
    server dropped (deleted, expired) is found within a few seconds rather than after three
    missed keep-alives.

Nodes that vanish
    A point whose node the server does not know (BadNodeIdUnknown, BadNodeIdInvalid: deleted,
    renamed, a PLC program reloaded) reads as quality "bad" while the other points keep
    flowing; it is logged once and logged again when it is back. In poll mode every Read asks
    again. In subscribe mode its monitored item is dropped (or was never created) and
    re-created by ``check`` with a backoff from ``retry_min`` to ``retry_max``
    (:mod:`drivers.opcua_monitor`), so one missing node never fails a subscription (Telegraf
    #19186).

Writes
    The Value attribute is written with a Variant of the node's own type (its DataType, or
    the current value's type when the DataType is abstract like Number; read once and cached)
    and no source or server timestamp: many PLCs reject those. A value that does not fit the
    type (2.5 for an Int32, 70000 for a UInt16) is a WriteError before anything is sent.
    ``exact`` tells the safety gate what the node will hold: the request rounded to the node's
    integer type or to float32 for a Float, through the same ``coerce`` the write uses.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from asyncua import Client, Node, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import Subscription
from asyncua.crypto import security_policies, uacrypto
from asyncua.crypto.uacrypto import InvalidSignature
from cryptography.hazmat.primitives import serialization

from drivers import opcua_pki
from drivers.base import BAD, GOOD, UNCERTAIN, Driver, Reading, ReadingSink, Value, float32_spacing, valid_text
from drivers.opcua_limits import OperationLimits, batched, read_limits
from drivers.opcua_monitor import MonitoredItems
from edge_agent.config import OpcUaDevice, OpcUaPoint
from edge_agent.errors import ConnectError, ReadError, WriteError

logger = logging.getLogger(__name__)

# What asyncua raises when the link or the server fails (asyncio.TimeoutError and
# ConnectionError are OSErrors on Python 3.11; InvalidSignature comes from the crypto layer).
LIBRARY_ERRORS = (OSError, ua.UaError, InvalidSignature)

# StatusCode severity is its top two bits: 00 good, 01 uncertain, 10 bad, 11 reserved (= bad).
_QUALITY = (GOOD, UNCERTAIN, BAD, BAD)
_PLAIN = frozenset((float, int, bool, str, type(None)))
# Seconds between keep-alives the server sends on an idle subscription: ten publishing
# intervals, at least 1 s, at most 5 s.
_KEEPALIVE_INTERVALS, _KEEPALIVE_MIN, _KEEPALIVE_MAX = 10, 1.0, 5.0
_STALE_KEEPALIVES = 3  # missed keep-alive periods before the subscription counts as dead
_PROBE_KEEPALIVES = 1.5  # silent keep-alive periods before asking the server whether it still exists
# Status codes that say the server does not know the node (any more).
_LOST = frozenset((ua.StatusCodes.BadNodeIdUnknown, ua.StatusCodes.BadNodeIdInvalid))

_INT_RANGES = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1), ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1), ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1), ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1), ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38


def quality(status: ua.StatusCode | None) -> str:
    """good, uncertain or bad from an OPC UA StatusCode (a missing one means Good)."""
    return GOOD if status is None else _QUALITY[status.value >> 30]


def plain(value: Any) -> Value:
    """A Reading value from whatever a Variant holds (enums, texts, times, arrays, ...)."""
    if value.__class__ in _PLAIN:
        return valid_text(value) if value.__class__ is str else value
    for kind in (bool, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, str):
        return valid_text(str(value))
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, ua.LocalizedText):
        return None if value.Text is None else valid_text(value.Text)
    return valid_text(str(value))


def reading(name: str, data: ua.DataValue, clock: Any = time.time) -> Reading:
    """One Reading from a DataValue: source time, else server time, else now."""
    variant = data.Value
    value = None if variant is None else variant.Value
    if value.__class__ not in _PLAIN or value.__class__ is str:
        value = plain(value)
    stamp = data.SourceTimestamp or data.ServerTimestamp
    status = data.StatusCode
    return Reading(name, value, GOOD if status is None else _QUALITY[status.value >> 30],
                   clock() if stamp is None else stamp.timestamp())


def node_lost(status: ua.StatusCode | None) -> bool:
    """True for the status of a node the server does not know (deleted, renamed, never there)."""
    return status is not None and status.value in _LOST


def keepalive_period(interval: float) -> float:
    """Seconds between the keep-alives asked of the server for a subscription publishing every ``interval``."""
    return min(_KEEPALIVE_MAX, max(_KEEPALIVE_MIN, _KEEPALIVE_INTERVALS * interval))


def resolve_node_id(text: str, namespaces: Sequence[str] | None) -> ua.NodeId:
    """Parse ``ns=2;s=X``, ``i=85`` or ``nsu=urn:x;s=X``; KeyError for an unknown namespace URI."""
    node_id = ua.NodeId.from_string(text)
    if not isinstance(node_id, ua.ExpandedNodeId) or not node_id.NamespaceUri:
        return node_id
    if namespaces is None or node_id.NamespaceUri not in namespaces:
        raise KeyError(node_id.NamespaceUri)
    return ua.NodeId(node_id.Identifier, ua.Int16(namespaces.index(node_id.NamespaceUri)))


def coerce(value: Any, kind: ua.VariantType) -> Any:
    """``value`` as the Python value of a Variant of ``kind``; ValueError when it does not fit."""
    if kind is ua.VariantType.Boolean:
        if value in (0, 1) and not isinstance(value, str):
            return bool(value)
        raise ValueError(f"expected true/false or 0/1 for a Boolean, got {value!r}")
    if kind in _INT_RANGES:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        low, high = _INT_RANGES[kind]
        if not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high} for {kind.name}, got {value!r}")
        return int(value)
    if kind in (ua.VariantType.Float, ua.VariantType.Double):
        if isinstance(value, str) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number for {kind.name}, got {value!r}")
        if kind is ua.VariantType.Float and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
            raise ValueError(f"{value!r} is out of range for Float")
        return float(value)
    if kind is ua.VariantType.String:
        return str(value)
    raise ValueError(f"writing {kind.name} values is not supported")


def new_client(device: OpcUaDevice) -> Client:
    """An unconnected asyncua Client for ``device``: timeouts, session, application identity, login."""
    # The watchdog reads ServerStatus with a timeout of watchdog_intervall, so it must not
    # be shorter than a request may take.
    client = Client(device.endpoint, timeout=device.timeout,
                    watchdog_intervall=max(device.interval, device.timeout))
    # A short session timeout frees the PLC's few session slots soon after the agent dies;
    # the watchdog's ServerStatus reads keep a live session from expiring.
    client.session_timeout = int(max(60.0, 10 * device.interval) * 1000)
    client.application_uri = opcua_pki.application_uri()
    client.name = client.description = "edge-agent"
    client.product_uri = "urn:edge-agent"
    if device.username is not None:
        client.set_user(device.username)
    if device.password is not None:
        client.set_password(device.password)
    return client


async def open_client(device: OpcUaDevice, data_dir: Path) -> Client:
    """A connected Client (secure channel and session) for ``device``; ConnectError on any failure.

    With a ``security`` other than None, the client certificate under ``data_dir/pki`` is used
    (created on first use), and the server must present the certificate it is held to: the one
    pinned by ``server_certificate``, else the one trusted on first use under
    ``data_dir/pki/trusted/``. A server presenting another one is refused before any secret is
    sent. Shared by the driver and the read-only commissioning tools.
    """
    client = new_client(device)
    first_use = None
    try:
        if device.security != "None":
            first_use = await _secure(client, device, data_dir)
        await client.connect()
    except LIBRARY_ERRORS as exc:  # asyncua has already closed the socket and channel
        raise ConnectError(device.name, f"cannot connect to {device.endpoint}: {_describe(exc)}") from exc
    if first_use is not None:  # the session proved the server holds the certificate's key: keep it
        try:
            await _trust_first_use(device, *first_use)
        except BaseException:
            await close_client(client, device.name)
            raise
    return client


async def close_client(client: Client, name: str) -> None:
    """Close the session and the socket; never raises."""
    try:
        await client.disconnect()
    except Exception as exc:  # closing must never raise; the session is gone either way
        logger.debug("%s: error while disconnecting: %r", name, exc)


async def _secure(client: Client, device: OpcUaDevice, data_dir: Path) -> tuple[Path, bytes] | None:
    """Set up the secure channel; returns (where to keep it, the certificate) when it is trusted on first use."""
    policy_name, _, mode_name = device.security.partition(",")
    policy = getattr(security_policies, f"SecurityPolicy{policy_name}")
    mode = getattr(ua.MessageSecurityMode, mode_name)
    try:
        pair = await asyncio.to_thread(opcua_pki.ensure_client_certificate, data_dir, client.application_uri)
    except (OSError, ValueError) as exc:
        raise ConnectError(device.name, "cannot prepare the client certificate under "
                           f"{data_dir / 'pki'}: {exc}") from exc
    offered = await _offered_certificate(client, device, policy, mode)
    endpoint = device.endpoint
    try:
        trust = await asyncio.to_thread(opcua_pki.expected_server_certificate, data_dir, endpoint,
                                        device.server_certificate)
    except (OSError, ValueError) as exc:
        raise ConnectError(device.name, f"cannot read the server certificate it is to be held to: {exc}") from exc
    if trust.der is not None and trust.der != offered:
        try:
            rejected = await asyncio.to_thread(opcua_pki.keep_rejected, data_dir, endpoint, offered)
        except OSError as exc:
            logger.debug("%s: cannot keep the refused certificate: %s", device.name, exc)
            rejected = data_dir / "pki" / opcua_pki.REJECTED_DIR / opcua_pki.endpoint_file_name(endpoint)
        raise ConnectError(device.name, opcua_pki.mismatch(endpoint, trust, offered, rejected))
    # The expected certificate, not the one just presented: asyncua encrypts to it and checks
    # the one in CreateSession against it.
    await client.set_security(policy, pair.cert_path, pair.key_path, server_certificate=trust.der or offered,
                              mode=mode)
    logger.info("%s: server certificate %s (%s); client certificate SHA-1 %s", device.name,
                opcua_pki.describe(offered), trust.source if trust.der else "first use", pair.thumbprint)
    return None if trust.der is not None else (trust.path, offered)


async def _offered_certificate(client: Client, device: OpcUaDevice, policy: type[security_policies.SecurityPolicy],
                               mode: ua.MessageSecurityMode) -> bytes:
    """The certificate the server presents on its endpoint for ``policy`` and ``mode`` (GetEndpoints)."""
    endpoints = await client.connect_and_get_server_endpoints()  # discovery, over a None channel
    endpoint = Client.find_endpoint(endpoints, mode, policy.URI)
    cert = uacrypto.x509_from_der(endpoint.ServerCertificate)  # the first of a chain
    if cert is None:
        raise ConnectError(device.name, f"the server's {device.security} endpoint presents no certificate")
    der: bytes = cert.public_bytes(serialization.Encoding.DER)
    return der


async def _trust_first_use(device: OpcUaDevice, path: Path, der: bytes) -> None:
    try:
        await asyncio.to_thread(opcua_pki.trust_on_first_use, path, der)
    except OSError as exc:
        raise ConnectError(device.name, f"cannot keep the server certificate in {path}: {exc}") from exc
    logger.warning("%s: trusting the server certificate of %s on first use: %s, kept in %s; it must not change "
                   "from now on (pin it with devices[].server_certificate to decide yourself)",
                   device.name, device.endpoint, opcua_pki.describe(der), path)


def exact_value(value: Any, kind: ua.VariantType) -> bool | int | float:
    """What a node of ``kind`` holds after ``value`` is written: ``coerce`` of the value rounded to the type.

    Integer types round to the nearest integer, Float to the nearest float32, Double keeps the
    value. Kinds are strict: a Boolean node takes only true/false, a numeric node only a real
    number (not a boolean); other types (String, DateTime, ...) are not written by the gate.
    ValueError when the value cannot be written.
    """
    if kind is ua.VariantType.Boolean:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false for a Boolean node, got {value!r}")
        return bool(coerce(value, kind))
    if kind not in _INT_RANGES and kind not in (ua.VariantType.Float, ua.VariantType.Double):
        raise ValueError(f"the node holds {kind.name} values; only numbers and booleans are written")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number for a node of type {kind.name}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"cannot write {value} to a node of type {kind.name}")
    if kind in _INT_RANGES:
        return int(coerce(round(value), kind))
    number = float(coerce(value, kind))
    if kind is ua.VariantType.Float:
        number = float(struct.unpack("<f", struct.pack("<f", number))[0])  # as the wire carries it
    return number


def _resolution(kind: ua.VariantType | None, value: float) -> float:
    if kind is ua.VariantType.Boolean or kind in _INT_RANGES:
        return 1.0
    if kind is ua.VariantType.Float:
        return float32_spacing(value)
    if kind is ua.VariantType.Double:
        return math.ulp(value)
    return 0.0


class PointSubscription(Subscription):
    """A data-change subscription that turns each publish response into one batch of readings.

    Client handles are indices into ``names``. Overrides ``publish_callback`` to skip
    asyncua's one-task-per-notification dispatch; keeps the bookkeeping its base does
    (``last_publish_at``, ``last_sequence_number``).
    """

    def __init__(self, client: Client, params: ua.CreateSubscriptionParameters,
                 names: Sequence[str], sink: ReadingSink, device: str) -> None:
        super().__init__(client.uaclient.session, params)
        self.names = list(names)
        self.sink = sink
        self.device = device
        self.failure: str | None = None
        self.sink_error: BaseException | None = None
        self.started = time.monotonic()
        self.lost: set[int] = set()  # handles whose node the server reported unknown
        self.keepalives = 0  # publish responses without data

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        """Called by asyncua's publish loop for every PublishResponse of this subscription."""
        self.last_publish_at = time.monotonic()  # data or keep-alive: either proves it alive
        message = publish_result.NotificationMessage
        if not message.NotificationData:
            self.keepalives += 1
            return
        self.last_sequence_number = int(message.SequenceNumber)
        batch: list[Reading] = []
        for notification in message.NotificationData:
            if isinstance(notification, ua.DataChangeNotification):
                self._convert(notification.MonitoredItems, batch)
            elif isinstance(notification, ua.StatusChangeNotification):
                self._status_changed(notification.Status)
        if batch:
            self._deliver_batch(batch)

    def _convert(self, items: Sequence[ua.MonitoredItemNotification], batch: list[Reading]) -> None:
        # The hot path: a few attribute loads and one tuple per notification.
        names, count, append, clock = self.names, len(self.names), batch.append, time.time
        for item in items:
            handle = item.ClientHandle
            if 0 <= handle < count:
                sample = reading(names[handle], item.Value, clock)
                append(sample)
                if sample[2] is BAD and node_lost(item.Value.StatusCode):
                    self.lost.add(handle)  # check() drops the item and re-creates it with backoff

    def _status_changed(self, status: ua.StatusCode) -> None:
        if not status.is_good():
            self.failure = f"server reported subscription status {status.name}"
            logger.debug("%s: %s", self.device, self.failure)

    def _deliver_batch(self, batch: list[Reading]) -> None:
        try:
            self.sink(batch)
        except Exception as exc:  # the sink is the agent's; asyncua would only log it
            if self.sink_error is None:
                logger.exception("%s: reading sink failed; check() will report it", self.device)
            self.sink_error = exc

    def silent_for(self) -> float:
        """Seconds since the last publish response (data or keep-alive)."""
        return time.monotonic() - (self.last_publish_at or self.started)


class OpcUaDriver(Driver):
    """One OPC UA server: connect, subscribe or poll its points, write typed values."""

    protocol: ClassVar[str] = "opcua"
    supports_subscribe: ClassVar[bool] = True
    device: OpcUaDevice

    def __init__(self, device: OpcUaDevice, data_dir: Path) -> None:
        super().__init__(device, data_dir)
        self.points: dict[str, OpcUaPoint] = {p.name: p for p in device.points}
        self._client: Client | None = None
        self._nodes: list[Node] = []
        self._node_by_point: dict[str, Node] = {}
        self._variant_types: dict[str, ua.VariantType] = {}
        self._subscription: PointSubscription | None = None
        self._stale_after = math.inf
        self._limits = OperationLimits()
        self._keepalive = keepalive_period(device.interval)
        self._probe_at = math.inf  # monotonic time of the next "does the subscription exist?" probe
        self._items: MonitoredItems | None = None
        self._vanished: set[str] = set()  # points whose node the server does not know (logged once)

    # ------------------------------------------------------------------ connect / close

    async def connect(self) -> None:
        """Open the session and resolve every point's node id; ConnectError on any failure."""
        await self.close()
        client = await open_client(self.device, self.data_dir)
        try:
            self._nodes = await self._resolve(client)
            self._limits = await read_limits(client, LIBRARY_ERRORS)
        except BaseException:
            await self._disconnect(client)
            raise
        self._node_by_point = {p.name: n for p, n in zip(self.device.points, self._nodes, strict=True)}
        self._client = client
        logger.info("%s: connected to %s (%d points, security %s; server limits per request: %s)",
                    self.device.name, self.device.endpoint, len(self._nodes), self.device.security,
                    self._limits.describe())

    async def _resolve(self, client: Client) -> list[Node]:
        namespaces: list[str] | None = None
        if any(p.node.startswith("nsu=") for p in self.device.points):
            try:
                namespaces = list(await client.get_namespace_array())
            except LIBRARY_ERRORS as exc:
                raise ConnectError(self.device.name, "cannot read the server's NamespaceArray: "
                                   f"{_describe(exc)}") from exc
        nodes = []
        for point in self.device.points:
            try:
                nodes.append(client.get_node(resolve_node_id(point.node, namespaces)))
            except KeyError as exc:
                raise ConnectError(self.device.name, f"namespace URI {exc} is not in the server's "
                                                     f"NamespaceArray {namespaces}", point=point.name) from None
            except ua.UaError as exc:
                raise ConnectError(self.device.name, f'bad node id "{point.node}": {exc}',
                                   point=point.name) from exc
        return nodes

    async def close(self) -> None:
        """Close the session and the socket; never raises."""
        client, self._client = self._client, None
        self._subscription = self._items = None
        self._variant_types.clear()
        self._probe_at = math.inf
        if client is not None:
            await self._disconnect(client)

    async def _disconnect(self, client: Client) -> None:
        await close_client(client, self.device.name)

    def _require(self, error: type[ReadError] | type[WriteError]) -> Client:
        if self._client is None:
            raise error(self.device.name, "not connected")
        return self._client

    # ------------------------------------------------------------------ read / subscribe / check

    async def read(self) -> list[Reading]:
        """Read every point's Value in one Read request, keeping each StatusCode."""
        client = self._require(ReadError)

        async def read_values(nodes: Sequence[Node]) -> list[ua.DataValue]:
            values: list[ua.DataValue] = await client.read_attributes(list(nodes), ua.AttributeIds.Value)
            return values

        try:
            values = await batched(read_values, self._nodes, self._limits, "read", self.device.name)
        except LIBRARY_ERRORS as exc:
            raise ReadError(self.device.name, f"read from {self.device.endpoint} failed: "
                            f"{_describe(exc)}") from exc
        readings = [reading(point.name, data) for point, data in zip(self.device.points, values, strict=True)]
        if self._vanished or any(r[2] is BAD for r in readings):
            self._note_vanished(readings, values)
        return readings

    def _note_vanished(self, readings: Sequence[Reading], values: Sequence[ua.DataValue]) -> None:
        """Log a node the server does not know once, and once again when it is back (poll mode)."""
        for sample, data in zip(readings, values, strict=True):
            name, status = sample.point, data.StatusCode
            if status is not None and node_lost(status):
                if name not in self._vanished:
                    self._vanished.add(name)
                    logger.warning("%s: point %s: the server does not know node %s (%s); point bad, asked "
                                   "again every read", self.device.name, name, self.points[name].node, status.name)
            elif name in self._vanished:
                self._vanished.discard(name)
                logger.info("%s: point %s: node %s is back", self.device.name, name, self.points[name].node)

    async def subscribe(self, sink: ReadingSink) -> None:
        """Monitor every point's Value; each publish response becomes one ``sink`` call."""
        client = self._require(ReadError)
        subscription = PointSubscription(client, self._subscription_params(self.device.interval * 1000.0),
                                         list(self.points), sink, self.device.name)
        try:
            created = await subscription.init()
        except LIBRARY_ERRORS as exc:
            raise ReadError(self.device.name, f"cannot subscribe: {_describe(exc)}") from exc
        self._subscription = subscription
        self._keepalive = created.RevisedPublishingInterval / 1000.0 * max(created.RevisedMaxKeepAliveCount, 1)
        self._stale_after = _STALE_KEEPALIVES * self._keepalive + self.device.timeout
        self._probe_at = time.monotonic() + _PROBE_KEEPALIVES * self._keepalive
        self._items = MonitoredItems(self.device, self._nodes, self._limits, LIBRARY_ERRORS)
        refused = await self._items.create(subscription, range(len(self._nodes)))
        if refused:
            self._items.refused(refused, sink)

    def _subscription_params(self, interval_ms: float) -> ua.CreateSubscriptionParameters:
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval_ms
        keepalive = max(1, math.ceil(keepalive_period(self.device.interval) / self.device.interval))
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = 10 * keepalive  # the spec asks for >= 3x the keep-alive count
        params.MaxNotificationsPerPublish = 0  # no limit: one response per interval
        params.PublishingEnabled = True
        params.Priority = 0
        return params

    async def check(self) -> None:
        """Raise ReadError when the connection, the session or the subscription is dead.

        Also drops the monitored items of nodes the server reported unknown, and re-creates
        the missing ones when their retry is due (:mod:`drivers.opcua_monitor`).
        """
        client = self._require(ReadError)
        name = self.device.name
        if client.state is not UaClientState.CONNECTED:
            raise ReadError(name, f"connection to {self.device.endpoint} lost ({client.state.value})")
        sub, items = self._subscription, self._items
        if sub is None or items is None:
            return
        if sub.sink_error is not None:
            raise ReadError(name, f"reading sink failed: {sub.sink_error!r}") from sub.sink_error
        if sub.failure is not None:
            raise ReadError(name, sub.failure)
        silent = sub.silent_for()
        if silent > self._stale_after:
            raise ReadError(name, f"no publish response for {silent:.1f} s "
                            f"(expected a keep-alive at least every {self._keepalive:.1f} s)")
        if silent > _PROBE_KEEPALIVES * self._keepalive and time.monotonic() >= self._probe_at:
            await self._probe(client, sub, silent)
        if sub.lost:
            lost, sub.lost = sub.lost, set()
            for point in await items.forget(sub, lost):
                self._variant_types.pop(point, None)  # a re-created node may have another type
        if items.due():
            await items.retry(sub)

    async def _probe(self, client: Client, sub: PointSubscription, silent: float) -> None:
        """Ask the server whether the subscription still exists (SetPublishingMode changes nothing)."""
        self._probe_at = time.monotonic() + self._keepalive
        params = ua.SetPublishingModeParameters(PublishingEnabled=True, SubscriptionIds=[sub.subscription_id])
        try:
            results = await client.uaclient.set_publishing_mode(params)
        except LIBRARY_ERRORS as exc:
            raise ReadError(self.device.name, f"no publish response for {silent:.1f} s, and the subscription "
                                              f"cannot be checked: {_describe(exc)}") from exc
        if results and not results[0].is_good():
            raise ReadError(self.device.name, f"the server no longer has subscription {sub.subscription_id} "
                                              f"({results[0].name}); no publish response for {silent:.1f} s")

    # ------------------------------------------------------------------ write

    async def write(self, point: str, value: Any) -> None:
        """Write ``value`` to the point's Value as the node's own type, without timestamps."""
        client = self._require(WriteError)
        config = self.points.get(point)
        if config is None or not config.writable:
            raise WriteError(self.device.name, "is not a writable point of this device", point=point)
        node = self._node_by_point[point]
        kind = await self._variant_type(point, node)
        try:
            data = ua.DataValue(ua.Variant(coerce(value, kind), kind))  # no Source/ServerTimestamp
        except ValueError as exc:
            raise WriteError(self.device.name, str(exc), point=point) from exc
        try:
            results = await client.write_values([node], [data], raise_on_partial_error=False)
        except LIBRARY_ERRORS as exc:
            raise WriteError(self.device.name, f"write failed: {_describe(exc)}", point=point) from exc
        status = results[0]
        if not status.is_good():
            raise WriteError(self.device.name, f"write of {value!r} refused by the server: {status.name}",
                             point=point)
        logger.debug("%s: wrote %r to %s as %s", self.device.name, value, point, kind.name)

    async def exact(self, point: str, value: Any) -> bool | int | float:
        """What the node holds after ``write(point, value)``: rounded to its own type (see :func:`exact_value`)."""
        self._require(WriteError)
        config = self.points.get(point)
        if config is None or not config.writable:
            raise WriteError(self.device.name, "is not a writable point of this device", point=point)
        kind = await self._variant_type(point, self._node_by_point[point])
        try:
            return exact_value(value, kind)
        except ValueError as exc:
            raise WriteError(self.device.name, str(exc), point=point) from exc

    def resolution(self, point: str, value: float) -> float:
        """One step of the node's type near ``value`` (0 until its type has been read)."""
        return _resolution(self._variant_types.get(point), value)

    async def _variant_type(self, point: str, node: Node) -> ua.VariantType:
        kind = self._variant_types.get(point)
        if kind is not None:
            return kind
        try:
            kind = await node.read_data_type_as_variant_type()
            if kind is ua.VariantType.Variant:  # abstract DataType (Number, BaseDataType): ask the value
                current = (await node.read_data_value()).Value
                kind = ua.VariantType.Null if current is None else current.VariantType
        except LIBRARY_ERRORS as exc:
            raise WriteError(self.device.name, f"cannot read the data type: {_describe(exc)}", point=point) from exc
        if kind is ua.VariantType.Null:
            raise WriteError(self.device.name, "cannot tell the type: its DataType is abstract and it holds no value",
                             point=point)
        self._variant_types[point] = kind
        return kind


def _describe(exc: BaseException) -> str:
    """A short cause for log lines and error messages (some asyncua errors have empty text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
