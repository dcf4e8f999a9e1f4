"""Walk an OPC UA server's address space and describe every Variable, read-only.

:func:`browse` opens one session (the driver's client set-up: security, client certificate, login),
then walks down from the Objects folder (or another root) one level at a time along hierarchical
references, to ``depth`` levels, visiting each node once (a visited set makes cycles harmless)
and stopping after ``max_nodes`` nodes. Every level is one Browse request per ``MaxNodesPerBrowse``
nodes; the Variables' attributes (Value, DataType, AccessLevel, UserAccessLevel) are read in as few
Read requests as the server's ``MaxNodesPerRead`` allows. Both limits are read from the server's
``ServerCapabilities.OperationLimits`` (0 or unreadable: no limit but our own cap).

Only the Browse, BrowseNext and Read services are used: nothing is written, nothing subscribed.

Node ids come out in the ``nsu=<namespace URI>;...`` form: a namespace index may change when the
server restarts or loads another model, its URI does not. Namespace 0 (the OPC UA namespace,
always index 0) keeps the short ``i=2258`` form.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import Client, ua

from drivers import opcua_pki
from drivers.opcua import LIBRARY_ERRORS, open_client, plain, resolve_node_id
from edge_agent.commission.defaults import DEFAULT_DEPTH, DEFAULT_MAX_NODES
from edge_agent.config import OpcUaDevice
from edge_agent.errors import ConnectError, ReadError, UsageError

log = logging.getLogger(__name__)

# Our own caps on one request, whatever the server allows: a Read of 4 attributes for 250
# variables is about 40 KiB of answer, well inside any server's message size.
READ_CAP = 1000
BROWSE_CAP = 500

_OBJECTS = ua.NodeId(ua.Int32(ua.ObjectIds.ObjectsFolder))
_LIMIT_READ = ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead))
_LIMIT_BROWSE = ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerBrowse))
_HIERARCHICAL = ua.NodeId(ua.Int32(ua.ObjectIds.HierarchicalReferences))
_ATTRIBUTES = (ua.AttributeIds.Value, ua.AttributeIds.DataType, ua.AttributeIds.AccessLevel,
               ua.AttributeIds.UserAccessLevel)
_READ_BIT = 1 << ua.AccessLevel.CurrentRead
_WRITE_BIT = 1 << ua.AccessLevel.CurrentWrite


@dataclass(frozen=True, slots=True)
class Variable:
    """One Variable found by :func:`browse`.

    ``node`` is usable as ``points[].node``; ``path`` joins the browse names from the root with
    ``/``; ``type`` is the DataType's name (``Double``, ``Float``, ``Boolean``, ``Int32``, or a
    server-defined one); ``value_type`` the built-in type the current value arrived as (it tells
    ``Float`` from ``Double`` when the DataType is abstract, like ``Number``).
    """

    node: str
    path: str
    browse_name: str
    type: str
    value_type: str | None
    array: bool
    readable: bool
    writable: bool
    value: Any  # JSON-able: numbers, booleans, strings, lists, None (NaN and infinities become None)
    status: str  # the StatusCode's name, "Good" for a good value


@dataclass(frozen=True, slots=True)
class BrowseResult:
    """What a walk found; ``stopped`` says why it ended early (the node cap), else None."""

    endpoint: str
    variables: tuple[Variable, ...]
    nodes: int
    stopped: str | None = None
    left_out: tuple[str, ...] = ()  # standard objects not walked (see ``include_server``)


@dataclass(slots=True)
class _Found:
    node_id: ua.NodeId
    path: str
    name: str
    order: tuple[int, ...]  # position in a depth-first listing: the parent's order + child index
    variable: bool


async def browse(device: OpcUaDevice, data_dir: Path, *, root: str | None = None, depth: int = DEFAULT_DEPTH,
                 max_nodes: int = DEFAULT_MAX_NODES, include_server: bool = False) -> BrowseResult:
    """Every Variable under ``root`` (default: the Objects folder) down to ``depth`` levels.

    ``device`` carries the endpoint, security and login (its points are ignored); the client
    certificate for a secured endpoint lives under ``data_dir/pki``. Raises ConnectError when the
    server cannot be reached, ReadError when a Browse or Read fails, UsageError for a ``root`` the
    server does not know.

    Walking the Objects folder, its standard children in namespace 0 (the Server object, with
    hundreds of status, capability and diagnostic variables) are left out unless ``include_server``;
    their names are in ``left_out``. ``root="i=2253"`` walks the Server object alone.
    """
    if depth < 1 or max_nodes < 1:
        raise UsageError("depth and max_nodes must be at least 1")
    try:
        client = await open_client(device, data_dir)
    except ConnectError as exc:
        if device.security == "None":
            raise
        cert = data_dir / "pki" / opcua_pki.CERT_FILE
        raise ConnectError(device.name, f"{exc.reason} (if the server does not trust this client yet, "
                                        f"have it trust {cert})") from exc
    try:
        return await _Walk(client, device, depth, max_nodes, include_server).run(root)
    except LIBRARY_ERRORS as exc:
        raise ReadError(device.name, f"browsing {device.endpoint} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        try:
            await client.disconnect()
        except Exception as exc:  # the answer is in hand; a failed goodbye changes nothing
            log.debug("%s: error while disconnecting: %r", device.endpoint, exc)


class _Walk:
    """One walk over one session: namespaces, limits, the breadth-first descent, the attribute reads."""

    def __init__(self, client: Client, device: OpcUaDevice, depth: int, max_nodes: int,
                 include_server: bool) -> None:
        self.client = client
        self.device = device
        self.depth = depth
        self.max_nodes = max_nodes
        self.include_server = include_server
        self.left_out: list[str] = []
        self.namespaces: list[str] = []
        self.read_limit = READ_CAP
        self.browse_limit = BROWSE_CAP

    async def run(self, root_text: str | None) -> BrowseResult:
        self.namespaces = list(await self.client.get_namespace_array())
        root = self._root_id(root_text)
        limits = await self._read([(_LIMIT_READ, ua.AttributeIds.Value), (_LIMIT_BROWSE, ua.AttributeIds.Value),
                                   (root, ua.AttributeIds.BrowseName)])
        self.read_limit = _limit(limits[0], READ_CAP)
        self.browse_limit = _limit(limits[1], BROWSE_CAP)
        if not _good(limits[2]):
            raise UsageError(f"--root {root_text}: the server has no such node ({_status_name(limits[2])})")
        root_name = _content(limits[2]).Name
        log.debug("%s: MaxNodesPerRead %d, MaxNodesPerBrowse %d (with our caps)", self.device.endpoint,
                  self.read_limit, self.browse_limit)
        found, stopped = await self._descend(_Found(root, root_name, root_name, (), False))
        variables = sorted((f for f in found if f.variable), key=lambda f: f.order)
        described = await self._describe(variables)
        return BrowseResult(self.device.endpoint, tuple(described), len(found), stopped, tuple(self.left_out))

    def _root_id(self, text: str | None) -> ua.NodeId:
        if text is None:
            return _OBJECTS
        try:
            return resolve_node_id(text, self.namespaces)
        except KeyError:
            raise UsageError(f"--root {text}: namespace URI not in the server's NamespaceArray "
                             f"{self.namespaces}") from None
        except (ValueError, ua.UaError) as exc:
            raise UsageError(f'--root: expected a node id like "nsu=urn:x;s=Line1" or "i=85", got "{text}"') from exc

    # ------------------------------------------------------------------ the descent

    async def _descend(self, root: _Found) -> tuple[list[_Found], str | None]:
        visited: set[ua.NodeId] = {root.node_id}
        found: list[_Found] = []
        level = [root]
        for _ in range(self.depth):
            following: list[_Found] = []
            for parent, references in zip(level, await self._children([f.node_id for f in level]), strict=True):
                for index, ref in enumerate(references):
                    node_id = self._local_id(ref.NodeId)
                    if node_id is None or node_id in visited:
                        continue  # on another server, or seen already (a cycle, or a second parent)
                    if parent is root and root.node_id == _OBJECTS and node_id.NamespaceIndex == 0 \
                            and not self.include_server:
                        self.left_out.append(ref.BrowseName.Name or node_id.to_string())
                        continue
                    if len(found) >= self.max_nodes:
                        return found, (f"stopped after {self.max_nodes} nodes (--max-nodes); narrow the walk "
                                       f"with --root or --depth, or raise --max-nodes")
                    visited.add(node_id)
                    name = ref.BrowseName.Name or ""
                    child = _Found(node_id, f"{parent.path}/{name}", name, (*parent.order, index),
                                   ref.NodeClass == ua.NodeClass.Variable)
                    found.append(child)
                    following.append(child)  # Variables too: they carry properties and components
            if not following:
                break
            level = following
        return found, None

    async def _children(self, nodes: Sequence[ua.NodeId]) -> list[list[ua.ReferenceDescription]]:
        """The hierarchical forward references to Objects and Variables of each node, in order."""
        out: list[list[ua.ReferenceDescription]] = []
        for chunk in _chunks(nodes, self.browse_limit):
            params = ua.BrowseParameters()
            params.View = ua.ViewDescription()
            params.RequestedMaxReferencesPerNode = 0  # the server's own limit; the rest by BrowseNext
            params.NodesToBrowse = [_description(node) for node in chunk]
            results = await self.client.uaclient.browse(params)
            for node, result in zip(chunk, results, strict=True):
                out.append(await self._all_references(node, result))
        return out

    async def _all_references(self, node: ua.NodeId, result: ua.BrowseResult) -> list[ua.ReferenceDescription]:
        if not result.StatusCode.is_good():
            log.warning("%s: cannot browse %s: %s", self.device.endpoint, node.to_string(), result.StatusCode.name)
            return []
        references = list(result.References)
        point = result.ContinuationPoint
        while point:
            params = ua.BrowseNextParameters(ReleaseContinuationPoints=False, ContinuationPoints=[point])
            following = (await self.client.uaclient.browse_next(params))[0]
            if not following.StatusCode.is_good():
                log.warning("%s: BrowseNext on %s failed: %s", self.device.endpoint, node.to_string(),
                            following.StatusCode.name)
                break
            references += following.References
            point = following.ContinuationPoint
        return references

    def _local_id(self, target: ua.NodeId) -> ua.NodeId | None:
        # asyncua decodes an ExpandedNodeId without server index or URI as a plain NodeId.
        if getattr(target, "ServerIndex", None):
            return None  # a node on another server
        index = target.NamespaceIndex
        uri = getattr(target, "NamespaceUri", None)
        if uri:
            if uri not in self.namespaces:
                return None
            index = ua.Int16(self.namespaces.index(uri))
        return ua.NodeId(target.Identifier, index, target.NodeIdType)

    # ------------------------------------------------------------------ the attributes

    async def _describe(self, variables: Sequence[_Found]) -> list[Variable]:
        answers = await self._read([(f.node_id, attribute) for f in variables for attribute in _ATTRIBUTES])
        type_names = await self._type_names([answers[4 * i + 1] for i in range(len(variables))])
        described = []
        for i, found in enumerate(variables):
            value, data_type, access, user_access = answers[4 * i:4 * i + 4]
            described.append(self._variable(found, value, type_names, data_type, access, user_access))
        return described

    def _variable(self, found: _Found, value: ua.DataValue, type_names: dict[ua.NodeId, str],
                  data_type: ua.DataValue, access: ua.DataValue, user_access: ua.DataValue) -> Variable:
        level = _byte(access)
        user_level = _byte(user_access) if _good(user_access) else level  # optional for some servers
        variant = value.Value
        content = None if variant is None else variant.Value
        type_id = _content(data_type)
        return Variable(
            node=self.portable_id(found.node_id),
            path=found.path,
            browse_name=found.name,
            type=type_names.get(type_id, "?") if isinstance(type_id, ua.NodeId) else "?",
            value_type=None if variant is None or content is None else variant.VariantType.name,
            array=isinstance(content, list | tuple),
            readable=bool(level & user_level & _READ_BIT),
            writable=bool(level & user_level & _WRITE_BIT),
            value=json_value(content) if _readable_status(value) else None,
            status=_status_name(value),
        )

    async def _type_names(self, answers: Sequence[ua.DataValue]) -> dict[ua.NodeId, str]:
        """DataType node id -> name: the standard ones from asyncua's table, the rest read from the server."""
        names: dict[ua.NodeId, str] = {}
        unknown: list[ua.NodeId] = []
        for answer in answers:
            type_id = _content(answer)
            if not isinstance(type_id, ua.NodeId) or type_id in names or type_id in unknown:
                continue
            numeric = type_id.NamespaceIndex == 0 and isinstance(type_id.Identifier, int)
            standard = ua.ObjectIdNames.get(int(type_id.Identifier)) if numeric else None
            if isinstance(standard, str):
                names[type_id] = standard
            else:
                unknown.append(type_id)
        read = await self._read([(type_id, ua.AttributeIds.BrowseName) for type_id in unknown])
        for type_id, answer in zip(unknown, read, strict=True):
            name = _content(answer)
            names[type_id] = name.Name if isinstance(name, ua.QualifiedName) else self.portable_id(type_id)
        return names

    async def _read(self, items: Sequence[tuple[ua.NodeId, ua.AttributeIds]]) -> list[ua.DataValue]:
        """One Read per ``read_limit`` attributes; the answers in the order asked."""
        answers: list[ua.DataValue] = []
        for chunk in _chunks(items, self.read_limit):
            params = ua.ReadParameters()
            params.TimestampsToReturn = ua.TimestampsToReturn.Neither
            params.NodesToRead = [ua.ReadValueId(NodeId=node, AttributeId=attribute) for node, attribute in chunk]
            answers += await self.client.uaclient.read(params)
        return answers

    def portable_id(self, node_id: ua.NodeId) -> str:
        """``nsu=<uri>;s=...`` for a node outside namespace 0 (``ns=<index>;...`` when the URI cannot be
        written there: unknown, or holding a ``;``), ``i=...`` in namespace 0."""
        index = node_id.NamespaceIndex
        if index == 0:
            return node_id.to_string()
        local = ua.NodeId(node_id.Identifier, ua.Int16(0), node_id.NodeIdType).to_string()
        uri = self.namespaces[index] if index < len(self.namespaces) else ""
        if not uri or ";" in uri:
            return node_id.to_string()
        return f"nsu={uri};{local}"


def _description(node: ua.NodeId) -> ua.BrowseDescription:
    description = ua.BrowseDescription()
    description.NodeId = node
    description.BrowseDirection = ua.BrowseDirection.Forward
    description.ReferenceTypeId = _HIERARCHICAL
    description.IncludeSubtypes = True
    description.NodeClassMask = ua.NodeClass.Object | ua.NodeClass.Variable
    description.ResultMask = ua.BrowseResultMask.All
    return description


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _limit(answer: ua.DataValue, cap: int) -> int:
    """A server's operation limit, within our cap; 0, absent or unreadable means no limit of its own."""
    value = _content(answer)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, cap)
    return cap


def _content(answer: ua.DataValue) -> Any:
    """The value of a good answer, else None."""
    return answer.Value.Value if _good(answer) and answer.Value is not None else None


def _good(answer: ua.DataValue) -> bool:
    return answer.StatusCode is None or answer.StatusCode.is_good()


def _readable_status(answer: ua.DataValue) -> bool:
    # Uncertain and even Bad_SensorFailure-like values may carry the last value; only drop it when
    # the server sent none.
    return answer.Value is not None


def _status_name(answer: ua.DataValue) -> str:
    return "Good" if answer.StatusCode is None else answer.StatusCode.name


def _byte(answer: ua.DataValue) -> int:
    value = _content(answer)
    return value if isinstance(value, int) else 0


def json_value(value: Any) -> Any:
    """A JSON-able form of a Variant's value: lists stay lists, NaN and infinities become None,
    times become ISO 8601 text, byte strings base64, anything else a plain number, text or bool."""
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    converted = plain(value)
    if isinstance(converted, float) and not math.isfinite(converted):
        return None
    return converted
