"""What a gateway process loads: only what its config uses (each check runs a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest


def loaded(script: str) -> list[str]:
    """Run ``script`` in a new interpreter; its last line of output, split on spaces."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].split()


def test_the_opcua_driver_loads_asyncua_without_its_server() -> None:
    names = loaded("import sys, drivers.opcua\n"
                   "print(int('asyncua.server' in sys.modules), int('asyncua.client' in sys.modules))")
    assert names == ["0", "1"]


@pytest.mark.parametrize("first", [
    "from asyncua import Server, Client, Node, uamethod, ua, __version__",
    "from asyncua.ua import NodeId; from asyncua import Server, Client, Node, uamethod, ua, __version__",
    "import asyncua.crypto.uacrypto; from asyncua import Server, Client, Node, uamethod, ua, __version__",
])
def test_asyncua_offers_its_whole_interface_after_the_drivers(first: str) -> None:
    """Tests and the demo plant run asyncua servers in processes that import the drivers too."""
    names = loaded(f"import drivers\n{first}\nimport asyncua, asyncua.server.server as s\n"
                   "print(Server is s.Server, Client.__module__, Node.__module__, ua.NodeId.__name__, "
                   "uamethod.__name__, asyncua.__version__, asyncua.Client is Client)")
    assert names == ["True", "asyncua.client.client", "asyncua.common.node", "NodeId", "uamethod",
                     metadata.version("asyncua"), "True"]


def test_an_unknown_asyncua_name_is_an_attribute_error() -> None:
    names = loaded("import drivers, asyncua\ntry:\n    asyncua.NoSuchThing\nexcept AttributeError as exc:\n"
                   "    print(type(exc).__name__, int('NoSuchThing' in str(exc)))")
    assert names == ["AttributeError", "1"]


def test_an_offline_gateway_loads_no_mqtt_client() -> None:
    """Without [mqtt] the agent never imports paho or the cloud sync (about 1.5 MB less)."""
    names = loaded("import sys, edge_agent.agent, edge_agent.cli.daemon\n"
                   "print(*sorted(m for m in ('paho', 'edge_agent.cloud.sync', 'edge_agent.cloud.link') "
                   "if m in sys.modules) or ['none'])")
    assert names == ["none"]
