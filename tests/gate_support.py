"""Support for the safety gate's tests: a small Modbus device that is not our simulator, an HMI that
writes to the real servers behind the agent's back, and checks on the gate's audit trail."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from asyncua import Client, Server, ua
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.agent import Agent
from edge_agent.control.gate import WriteResult
from edge_agent.demo.plant import NAMESPACE_URI
from edge_agent.store.views import TwinView
from tests.helpers import free_port, wait_for


async def stored(twin: TwinView, result: WriteResult) -> dict[str, Any]:
    """The audit row of ``result`` once the agent's writer has stored it."""
    def find() -> dict[str, Any] | None:
        return next((w for w in twin.writes() if w["ts"] == result.ts and w["point"] == result.point), None)
    row = await wait_for(find, timeout=5, what=f"the audit row of {result}")
    assert row is not None
    return row


async def assert_recorded(twin: TwinView, result: WriteResult, status: str, reason: str) -> None:
    """``result`` has ``status`` and a reason containing ``reason``, in the result, the audit and desired."""
    assert result.result == status, result
    assert reason in result.reason, result
    row = await stored(twin, result)
    assert (row["result"], row["reason"], row["source"]) == (status, result.reason, result.source)
    assert row["requested"] == result.requested and row["old"] == result.old
    desired_rows = {d["point"]: d for d in twin.desired()}
    if result.point == "nope":  # a point that does not exist gets an audit row, never a desired state
        assert "nope" not in desired_rows
        return
    desired = desired_rows[result.point]
    assert (desired["status"], desired["reason"], desired["source"]) == (status, result.reason, result.source)
    if isinstance(result.requested, float):
        assert desired["value"] == result.requested


async def assert_undone(twin: TwinView, result: WriteResult, restored: float) -> dict[str, Any]:
    """``result`` failed its read-back and was undone: its audit row, then a rollback row that wrote
    ``restored`` back and confirmed it, which is also the point's desired state. Returns the rollback row."""
    assert result.result == "failed" and result.reason.endswith(f"; restored to {restored:g}"), result
    row = await stored(twin, result)
    assert (row["result"], row["reason"], row["source"]) == ("failed", result.reason, result.source)

    def undo() -> dict[str, Any] | None:
        return next((w for w in twin.writes() if w["id"] > row["id"] and w["point"] == result.point), None)
    back = await wait_for(undo, timeout=5, what="the rollback row")
    assert (back["source"], back["result"], back["written"], back["readback"]) == (
        "rollback", "rolled_back", restored, restored), back
    assert back["reason"] == f"undoing the unconfirmed write of {result.written:g} ({result.source})"
    desired = {d["point"]: d for d in twin.desired()}[result.point]
    assert (desired["value"], desired["status"], desired["source"]) == (restored, "rolled_back", "rollback")
    return back


async def gate_watching(agent: Agent, *points: str) -> None:
    """Wait until the gate has taken each point's live value as the one it knows (its first look comes
    within a tick of the first reading); a change at the device before that is the baseline, not news."""
    for point in points:
        await wait_for(lambda p=point: p in agent.gate.overrides.known, timeout=5,
                       what=f"the gate's baseline for {point}")


def f32(value: float) -> float:
    """``value`` rounded to float32."""
    return float(struct.unpack(">f", struct.pack(">f", value))[0])


class Registers:
    """A small pymodbus server (not the project's simulator): 32 holding registers and 16 coils, unit 1.

    ``ignore``: addresses whose writes the device acknowledges and drops (set it after seeding
    values: the server's own setValues pass here too). ``late``: address -> seconds; a write that
    touches one is acknowledged at once and applied that much later, writes landing in order.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.ignore: set[int] = set()
        self.late: dict[int, float] = {}
        self.server: ModbusTcpServer | None = None
        self._landing: list[tuple[int, list[int]]] = []  # late writes being applied now: let them through
        self._tasks: set[asyncio.Task[None]] = set()

    async def _action(self, function: int, start: int, address: int, count: int, registers: list[int],
                      values: list[int] | list[bool] | None) -> None:
        if values is None or function not in (6, 16):
            return None
        if (address, list(values)) in self._landing:
            self._landing.remove((address, list(values)))  # type: ignore[arg-type]
            return None
        delay = max((self.late.get(address + i, 0.0) for i in range(count)), default=0.0)
        if delay > 0:
            wanted = [int(v) for v in values]
            values[:] = registers[address - start:address - start + count]  # type: ignore[index]
            asyncio.get_running_loop().call_later(delay, self._land, address, wanted)
            return None
        for i in range(count):
            if address + i in self.ignore:
                values[i] = registers[address - start + i]  # type: ignore[call-overload]
        return None

    def _land(self, address: int, values: list[int]) -> None:
        self._landing.append((address, values))
        task = asyncio.get_running_loop().create_task(self.set_holding(address, values))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> Registers:
        holding = [SimData(0, count=32, values=0, datatype=DataType.REGISTERS)]
        blocks = ([SimData(0, count=16, values=False, datatype=DataType.BITS)],
                  [SimData(0, count=16, values=False, datatype=DataType.BITS)], holding,
                  [SimData(0, count=8, values=0, datatype=DataType.REGISTERS)])
        self.server = ModbusTcpServer(SimDevice(1, simdata=blocks, action=self._action),
                                      address=("127.0.0.1", self.port))
        await self.server.serve_forever(background=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            await self.server.shutdown()

    async def holding(self, address: int, count: int) -> list[int]:
        assert self.server is not None
        return list(await self.server.async_getValues(1, 3, address, count))

    async def set_holding(self, address: int, values: list[int]) -> None:
        assert self.server is not None
        await self.server.async_setValues(1, 16, address, values)


# ---------------------------------------------------------------------------- another client (an HMI)


async def modbus_holding(port: int, address: int, count: int) -> list[int]:
    """Raw holding registers as a separate Modbus client sees them."""
    async with AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5) as client:
        response = await client.read_holding_registers(address, count=count, device_id=1)
        assert not response.isError(), response
        return list(response.registers)


async def hmi_write_registers(port: int, address: int, values: list[int]) -> None:
    """Write holding registers the way an HMI or a SCADA client does: its own Modbus TCP connection."""
    async with AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5) as client:
        if len(values) == 1:
            response = await client.write_register(address, values[0], device_id=1)
        else:
            response = await client.write_registers(address, values, device_id=1)
        assert not response.isError(), response


async def hmi_write_setpoint(endpoint: str, value: float) -> None:
    """Write the simulated chiller's setpoint node the way an OPC UA HMI does: its own session."""
    async with Client(endpoint, timeout=5) as client:
        ns = await client.get_namespace_index(NAMESPACE_URI)
        node = client.get_node(f"ns={ns};s=Chiller1.Setpoint")
        await node.write_value(ua.DataValue(ua.Variant(value, ua.VariantType.Double)))


# ---------------------------------------------------------------------------- an OPC UA server with typed nodes

TYPED_URI = "urn:edge-agent:typed-nodes"
# name -> (initial value, the node's type)
TYPED: dict[str, tuple[Any, ua.VariantType]] = {
    "Count": (5, ua.VariantType.Int16),
    "Ratio": (0.5, ua.VariantType.Float),
    "Running": (False, ua.VariantType.Boolean),
}


@asynccontextmanager
async def typed_nodes() -> AsyncIterator[tuple[str, Server, dict[str, ua.NodeId]]]:
    """An asyncua server (not the demo plant) with one writable node per entry of TYPED, under
    ``nsu=TYPED_URI;s=Line1.<Name>``: yields its endpoint, the server and the node ids."""
    server = Server()
    await server.init()
    server.disable_clock()  # its 1 s loop would make stop() wait a second
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/typed/"
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace(TYPED_URI)
    line = await server.nodes.objects.add_object(ua.NodeId("Line1", ns), "Line1")
    ids = {}
    for name, (value, kind) in TYPED.items():
        node = await line.add_variable(ua.NodeId(f"Line1.{name}", ns), name, ua.Variant(value, kind))
        await node.set_writable()
        ids[name] = node.nodeid
    await server.start()
    try:
        yield endpoint, server, ids
    finally:
        await server.stop()


async def opcua_node_write(endpoint: str, name: str, value: Any, kind: ua.VariantType) -> None:
    """Write a node of :func:`typed_nodes` from a session of its own (an HMI)."""
    async with Client(endpoint, timeout=5) as client:
        ns = await client.get_namespace_index(TYPED_URI)
        await client.get_node(f"ns={ns};s=Line1.{name}").write_value(ua.DataValue(ua.Variant(value, kind)))
