"""``edge-agent browse`` on a large server: wall time and requests, against a naive walk in the same run.

An asyncua server with ``--objects`` objects of ``--vars`` Double variables each runs in this
process (its PreRead callback counts the Read requests that arrive). The same address space is
walked twice:

- **browse**: :func:`edge_agent.commission.browse.browse`, one Browse per level (per
  MaxNodesPerBrowse nodes) and one Read per MaxNodesPerRead attributes;
- **naive**: asyncua's ``Node.get_children`` per node and one ``read_attributes`` per variable
  (Value, DataType, AccessLevel, UserAccessLevel), as a script written in a hurry would do.

The figure to look at is the ratio of the two in the same run (the machine is noisy). Prints
figures only; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from asyncua import Client, Server, ua
from asyncua.common.callback import CallbackType
from common import free_port

from edge_agent.commission.browse import browse
from edge_agent.config import OpcUaDevice


async def serve(objects: int, per_object: int) -> tuple[Server, str, list[int]]:
    server = Server()
    await server.init()
    server.disable_clock()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/bench/"
    server.set_endpoint(endpoint)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:edge-agent:bench-browse")
    for o in range(objects):
        parent = await server.nodes.objects.add_object(ua.NodeId(f"O{o}", ns), ua.QualifiedName(f"Object{o}", ns))
        for v in range(per_object):
            await parent.add_variable(ua.NodeId(f"O{o}.V{v}", ns), ua.QualifiedName(f"Var{v}", ns), float(v))
    reads: list[int] = []

    def on_read(event: Any, _: Any) -> None:
        if event.is_external:
            reads.append(len(event.request_params.NodesToRead))

    server.subscribe_server_callback(CallbackType.PreRead, on_read)
    await server.start()
    return server, endpoint, reads


async def naive(endpoint: str) -> int:
    attributes = [ua.AttributeIds.Value, ua.AttributeIds.DataType, ua.AttributeIds.AccessLevel,
                  ua.AttributeIds.UserAccessLevel]
    found = 0
    async with Client(endpoint, timeout=30) as client:
        stack = [(client.nodes.objects, 0)]
        while stack:
            node, depth = stack.pop()
            if depth >= 6:
                continue
            for child in await node.get_children():
                if child.nodeid.NamespaceIndex == 0:
                    continue  # the Server object, as browse leaves it out
                if await child.read_node_class() == ua.NodeClass.Variable:
                    for attribute in attributes:
                        await child.read_attribute(attribute, raise_on_bad_status=False)
                    found += 1
                stack.append((child, depth + 1))
    return found


async def main(objects: int, per_object: int) -> None:
    server, endpoint, reads = await serve(objects, per_object)
    try:
        device = OpcUaDevice(name="bench", protocol="opcua", endpoint=endpoint, timeout=30.0)
        start = time.perf_counter()
        result = await browse(device, Path("/nonexistent"))
        ours = time.perf_counter() - start
        ours_reads = len(reads)
        reads.clear()
        start = time.perf_counter()
        theirs_found = await naive(endpoint)
        theirs = time.perf_counter() - start
        print(f"{objects} objects x {per_object} variables = {objects * per_object} variables")
        print(f"browse: {len(result.variables)} variables in {ours:.2f} s, {ours_reads} Read requests")
        print(f"naive:  {theirs_found} variables in {theirs:.2f} s, {len(reads)} Read requests")
        print(f"naive / browse wall time: {theirs / ours:.1f}x")
    finally:
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=20, help="objects under Objects (default 20)")
    parser.add_argument("--vars", type=int, default=100, help="Double variables per object (default 100)")
    options = parser.parse_args()
    asyncio.run(main(options.objects, options.vars))
