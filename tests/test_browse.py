"""``edge-agent browse`` (and ``check-config --probe``) against real asyncua servers.

The server records every Read and Write request through its PreRead/PreWrite callbacks, so the
tests see on the server's side that browsing never writes and keeps each Read within the
``MaxNodesPerRead`` the server advertises.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asyncua import Node, Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_agent import cli
from edge_agent import config as config_mod
from edge_agent.commission.emit import point_names, snake_case
from tests import builders
from tests.helpers import free_port

NS = "urn:edge-agent:test-browse"
READ_LIMIT = 5  # the server advertises MaxNodesPerRead = 5


@dataclass
class Plc:
    """A running asyncua server (see :func:`plc`) and what its callbacks saw."""

    server: Server
    endpoint: str
    ns: int
    nodes: dict[str, Node] = field(default_factory=dict)
    reads: list[int] = field(default_factory=list)  # the size of every Read request from a client
    writes: list[ua.WriteParameters] = field(default_factory=list)

    def nsu(self, name: str) -> str:
        return f"nsu={NS};s={name}"

    def values(self) -> dict[str, ua.DataValue]:
        """Every variable's DataValue as the server holds it."""
        return {name: self.server.read_attribute_value(node.nodeid) for name, node in self.nodes.items()}


class Operator(UserManager):
    """Accepts "operator" / "s3cret" only."""

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        return User(role=UserRole.User) if (username, password) == ("operator", "s3cret") else None


def server_certificate() -> tuple[bytes, bytes]:
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, "edge-agent test server", {},
        [x509.UniformResourceIdentifier("urn:edge-agent:test-server"), x509.DNSName(socket.gethostname())],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.DER), pem


@asynccontextmanager
async def plc(*, secure: bool = False, first_namespace: str | None = None) -> AsyncIterator[Plc]:
    """A server with this address space under Objects (ns = our namespace)::

        Line1/                 Object
          Temp      Double  21.5, writable; with a property Range (String)
          Ratio     Float   0.5
          Count     Int32   -7
          Running   Boolean True
          Speed     UInt16  1200
          Level     Number (abstract DataType) holding a Float 1.5
          Broken    Double  with status BadSensorFailure
          Samples   Double[] [1.0, 2.0]
          Secret    Double  AccessLevel 0 (not readable)
          Guarded   Double  AccessLevel read+write, UserAccessLevel read only
          Pump/     Object; Temp Double 40.0, and an Organizes reference back to Line1 (a cycle)
          Deep/L2/L3/Bottom   Double 1.0, five levels below Objects

    ``secure``: only Basic256Sha256 SignAndEncrypt, and only user "operator" / "s3cret".
    ``first_namespace`` is registered before ours, so our namespace gets another index.
    """
    server = Server(user_manager=Operator() if secure else None)
    await server.init()
    server.disable_clock()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/browse-test/"
    server.set_endpoint(endpoint)
    if secure:
        certificate, key = server_certificate()
        await server.set_application_uri("urn:edge-agent:test-server")
        await server.load_certificate(certificate, format="der")
        await server.load_private_key(key, format="pem")
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    if first_namespace:
        await server.register_namespace(first_namespace)
    ns = await server.register_namespace(NS)
    result = Plc(server, endpoint, ns)
    await _address_space(server, result)
    limit = ua.NodeId(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
    await server.write_attribute_value(limit, ua.DataValue(ua.Variant(READ_LIMIT, ua.VariantType.UInt32)))

    def on_read(event: ServerItemCallback, _: Any) -> None:
        if event.is_external:
            result.reads.append(len(event.request_params.NodesToRead))

    def on_write(event: ServerItemCallback, _: Any) -> None:
        if event.is_external:
            result.writes.append(event.request_params)

    server.subscribe_server_callback(CallbackType.PreRead, on_read)
    server.subscribe_server_callback(CallbackType.PreWrite, on_write)
    await server.start()
    try:
        yield result
    finally:
        await server.stop()


async def _address_space(server: Server, plc: Plc) -> None:
    ns = plc.ns

    async def variable(parent: Node, key: str, name: str, value: Any, kind: ua.VariantType,
                       datatype: int | None = None) -> Node:
        node = await parent.add_variable(ua.NodeId(key, ns), ua.QualifiedName(name, ns), ua.Variant(value, kind),
                                         datatype=None if datatype is None else ua.NodeId(datatype))
        plc.nodes[key] = node
        return node

    line = await server.nodes.objects.add_object(ua.NodeId("Line1", ns), ua.QualifiedName("Line1", ns))
    temp = await variable(line, "Line1.Temp", "Temp", 21.5, ua.VariantType.Double)
    await temp.set_writable()
    await temp.add_property(ua.NodeId("Line1.Temp.Range", ns), ua.QualifiedName("Range", ns), "0..100")
    await variable(line, "Line1.Ratio", "Ratio", 0.5, ua.VariantType.Float)
    await variable(line, "Line1.Count", "Count", -7, ua.VariantType.Int32)
    await variable(line, "Line1.Running", "Running", True, ua.VariantType.Boolean)
    await variable(line, "Line1.Speed", "Speed", 1200, ua.VariantType.UInt16)
    await variable(line, "Line1.Level", "Level", 1.5, ua.VariantType.Float, ua.ObjectIds.Number)
    broken = await variable(line, "Line1.Broken", "Broken", 0.0, ua.VariantType.Double)
    await server.write_attribute_value(broken.nodeid, ua.DataValue(
        ua.Variant(0.0, ua.VariantType.Double), StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure)))
    await variable(line, "Line1.Samples", "Samples", [1.0, 2.0], ua.VariantType.Double)
    secret = await variable(line, "Line1.Secret", "Secret", 9.0, ua.VariantType.Double)
    await _access(secret, 0, 0)
    guarded = await variable(line, "Line1.Guarded", "Guarded", 3.0, ua.VariantType.Double)
    await _access(guarded, 3, 1)
    pump = await line.add_object(ua.NodeId("Line1.Pump", ns), ua.QualifiedName("Pump", ns))
    await variable(pump, "Line1.Pump.Temp", "Temp", 40.0, ua.VariantType.Double)
    await pump.add_reference(line.nodeid, ua.ObjectIds.Organizes)  # Pump -> Line1: a cycle
    parent = line
    for name in ("Deep", "L2", "L3"):
        parent = await parent.add_object(ua.NodeId(f"Line1.{name}", ns), ua.QualifiedName(name, ns))
    await variable(parent, "Line1.Bottom", "Bottom", 1.0, ua.VariantType.Double)


async def _access(node: Node, level: int, user_level: int) -> None:
    for attribute, value in ((ua.AttributeIds.AccessLevel, level), (ua.AttributeIds.UserAccessLevel, user_level)):
        await node.write_attribute(attribute, ua.DataValue(ua.Variant(value, ua.VariantType.Byte)))


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The real CLI in a worker thread (it runs its own event loop) while the server serves on ours."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def by_path(out: str) -> dict[str, dict[str, Any]]:
    rows = json.loads(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a variable listed twice"
    return {r["path"]: r for r in rows}


LINE = "Objects/Line1"
EVERY_VARIABLE = {f"{LINE}/{name}" for name in (
    "Temp", "Temp/Range", "Ratio", "Count", "Running", "Speed", "Level", "Broken", "Samples", "Secret", "Guarded",
    "Pump/Temp", "Deep/L2/L3/Bottom")}


# --------------------------------------------------------------------------------------- browse


async def test_browse_lists_every_variable_with_node_type_access_and_value(
        capsys: pytest.CaptureFixture[str]) -> None:
    async with plc() as server:
        before = server.values()
        code, out, _ = await run_cli(capsys, "browse", server.endpoint, "--json")
        assert code == 0
        found = by_path(out)
        assert set(found) == EVERY_VARIABLE  # the cycle through Pump -> Line1 walked once; no Server object
        temp = found[f"{LINE}/Temp"]
        assert temp == {"node": server.nsu("Line1.Temp"), "path": f"{LINE}/Temp", "browse_name": "Temp",
                        "type": "Double", "value_type": "Double", "array": False, "readable": True,
                        "writable": True, "value": 21.5, "status": "Good"}
        assert {name: found[f"{LINE}/{name}"]["type"] for name in ("Ratio", "Count", "Running", "Speed", "Level")} \
            == {"Ratio": "Float", "Count": "Int32", "Running": "Boolean", "Speed": "UInt16", "Level": "Number"}
        assert [found[f"{LINE}/{name}"]["value"] for name in ("Ratio", "Count", "Running", "Speed")] \
            == [0.5, -7, True, 1200]
        assert (found[f"{LINE}/Level"]["value_type"], found[f"{LINE}/Level"]["value"]) == ("Float", 1.5)
        assert found[f"{LINE}/Broken"]["status"] == "BadSensorFailure"
        assert (found[f"{LINE}/Samples"]["array"], found[f"{LINE}/Samples"]["value"]) == (True, [1.0, 2.0])
        assert (found[f"{LINE}/Secret"]["readable"], found[f"{LINE}/Secret"]["writable"]) == (False, False)
        assert (found[f"{LINE}/Guarded"]["readable"], found[f"{LINE}/Guarded"]["writable"]) == (True, False)
        assert found[f"{LINE}/Pump/Temp"]["node"] == server.nsu("Line1.Pump.Temp")
        assert found[f"{LINE}/Temp/Range"]["value"] == "0..100"
        assert not any(r["writable"] for p, r in found.items() if not p.endswith("/Temp") or "Pump" in p)

        # the text table says the same, and that the Server object was left out
        code, text, _ = await run_cli(capsys, "browse", server.endpoint)
        assert code == 0
        assert "13 variables (1 writable)" in text and "nothing was written" in text
        assert "left out the standard" in text and "Server" in text
        line = next(row for row in text.splitlines() if row.startswith(f"{LINE}/Temp "))
        assert line.split() == [f"{LINE}/Temp", "Double", "rw", "21.5", "Good", server.nsu("Line1.Temp")]

        # read-only, and within the server's MaxNodesPerRead
        assert server.writes == []
        assert server.values() == before
        assert server.reads and max(server.reads) <= READ_LIMIT


async def test_depth_root_max_nodes_and_the_server_object(capsys: pytest.CaptureFixture[str]) -> None:
    async with plc() as server:
        code, out, _ = await run_cli(capsys, "browse", server.endpoint, "--json", "--depth", "2")
        assert code == 0
        assert set(by_path(out)) == {f"{LINE}/{name}" for name in (
            "Temp", "Ratio", "Count", "Running", "Speed", "Level", "Broken", "Samples", "Secret", "Guarded")}

        code, out, _ = await run_cli(capsys, "browse", server.endpoint, "--json", "--root", server.nsu("Line1.Deep"))
        assert code == 0
        assert set(by_path(out)) == {"Deep/L2/L3/Bottom"}

        code, out, err = await run_cli(capsys, "browse", server.endpoint, "--json", "--max-nodes", "4")
        assert code == 0
        assert len(json.loads(out)) <= 3  # Line1 is one of the four nodes
        assert "stopped after 4 nodes (--max-nodes)" in err

        code, out, _ = await run_cli(capsys, "browse", server.endpoint, "--json", "--include-server")
        assert code == 0
        found = by_path(out)
        assert found["Objects/Server/ServerStatus/CurrentTime"]["node"] == "i=2258"
        assert set(found) > EVERY_VARIABLE

        code, _, err = await run_cli(capsys, "browse", server.endpoint, "--root", "nsu=urn:nobody;s=X")
        assert code == 2 and "namespace URI not in the server's NamespaceArray" in err
        code, _, err = await run_cli(capsys, "browse", server.endpoint, "--root", server.nsu("NoSuchNode"))
        assert code == 2 and "the server has no such node" in err
        assert server.writes == []


async def test_toml_block_loads_with_check_config_and_its_nsu_ids_survive_a_namespace_shift(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with plc() as server:
        code, block, _ = await run_cli(capsys, "browse", server.endpoint, "--toml", "plc1")
        assert code == 0
        endpoint = server.endpoint
    assert 'name = "plc1"' in block and 'protocol = "opcua"' in block and f'endpoint = "{endpoint}"' in block
    assert 'security = "None"' in block
    config = tmp_path / "agent.toml"
    config.write_text(builders.toml(builders.config(tmp_path / "data")) + "\n" + block)
    loaded = config_mod.load(config)
    points = {p.name: p.node for p in loaded.devices[0].points}
    assert points == {
        "plc1.range": server.nsu("Line1.Temp.Range"), "plc1.ratio": server.nsu("Line1.Ratio"),
        "plc1.count": server.nsu("Line1.Count"), "plc1.running": server.nsu("Line1.Running"),
        "plc1.speed": server.nsu("Line1.Speed"), "plc1.level": server.nsu("Line1.Level"),
        "plc1.broken": server.nsu("Line1.Broken"), "plc1.guarded": server.nsu("Line1.Guarded"),
        "plc1.temp_2": server.nsu("Line1.Pump.Temp"), "plc1.bottom": server.nsu("Line1.Bottom"),
    }  # plc1.temp (writable), plc1.samples (an array) and plc1.secret (not readable) are commented out
    assert '# name = "plc1.temp"' in block and '# name = "plc1.samples"' in block and '# name = "plc1.secret"' in block
    assert "it needs min and max" in block

    # the same ids on a server whose namespace index moved (another namespace registered first)
    async with plc(first_namespace="urn:edge-agent:someone-else") as moved:
        assert moved.ns != server.ns
        config.write_text(config.read_text().replace(endpoint, moved.endpoint))
        code, out, _ = await run_cli(capsys, "check-config", "--config", str(config), "--probe")
        assert moved.writes == []
    assert code == 1  # plc1.broken reads bad: the probe says so and fails
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  plc1.")}
    assert rows["plc1.ratio"] == ["good", "0.5"] and rows["plc1.temp_2"] == ["good", "40"]
    assert rows["plc1.broken"][0] == "bad" and rows["plc1.bottom"] == ["good", "1"]
    assert "plc1 (opcua): connected, 10 points read, 1 bad" in out

    # uncommenting the writable point as it is: check-config asks for its range
    text = config.read_text()
    start = text.index('  # [[devices.points]]\n  # name = "plc1.temp"')
    end = text.index("# writable = true", start) + len("# writable = true")
    config.write_text(text[:start] + text[start:end].replace("  # ", "  ") + text[end:])
    code, _, err = await run_cli(capsys, "check-config", "--config", str(config))
    assert code == 2
    assert "min: required when writable = true" in err and "max: required when writable = true" in err


async def test_secure_browse_with_login_and_a_password_file(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    data = tmp_path / "commissioning"
    async with plc(secure=True) as server:
        mode = "Basic256Sha256,SignAndEncrypt"
        code, out, err = await run_cli(capsys, "browse", server.endpoint, "--security", mode, "--username", "operator",
                                       "--password-file", str(password), "--data-dir", str(data), "--json")
        assert code == 0, err
        assert by_path(out)[f"{LINE}/Temp"]["value"] == 21.5
        assert (data / "pki" / "client_cert.der").is_file()
        assert os.stat(data / "pki" / "client_key.pem").st_mode & 0o077 == 0

        code, block, _ = await run_cli(capsys, "browse", server.endpoint, "--security", mode, "--username",
                                       "operator", "--password-file", str(password), "--data-dir", str(data),
                                       "--toml", "plc1")
        assert code == 0
        assert f'security = "{mode}"' in block and 'username = "operator"' in block and "s3cret" not in block

        code, _, err = await run_cli(capsys, "browse", server.endpoint, "--security", mode, "--username", "operator",
                                     "--password-file", str(wrong), "--data-dir", str(data))
        assert code == 1
        assert f"cannot connect to {server.endpoint}" in err

        code, _, err = await run_cli(capsys, "browse", server.endpoint, "--data-dir", str(data))
        assert code == 1  # the server offers no unsecured endpoint
        assert f"cannot connect to {server.endpoint}" in err
        assert server.writes == []


async def test_unreachable_server_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/nobody/"
    code, _, err = await run_cli(capsys, "browse", endpoint, "--timeout", "1s")
    assert code == 1
    assert f"cannot connect to {endpoint}" in err
    usage = [
        (["http://127.0.0.1:4840"], 'expected an URL starting with "opc.tcp://"'),
        ([endpoint, "--password-file", str(tmp_path / "p")], "--password-file needs --username"),
        ([endpoint, "--username", "u", "--password-file", str(tmp_path / "missing")], "cannot read"),
        ([endpoint, "--depth", "0"], "--depth and --max-nodes"),
        ([endpoint, "--toml", " "], "--toml: expected a device name"),
    ]
    for argv, message in usage:
        code, _, err = await run_cli(capsys, "browse", *argv)
        assert (code, message in err) == (2, True), (argv, err)


def test_browse_help_says_it_is_read_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["browse", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "never writes to the server" in help_text
    assert "--password-file" in help_text and "--password " not in help_text


# --------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(("browse_name", "expected"), [
    ("SupplyTemp", "supply_temp"), ("Temp", "temp"), ("HTTPPort", "http_port"), ("PT-101.PV", "pt_101_pv"),
    ("motor speed", "motor_speed"), ("Level2Max", "level2_max"), ("___", "point"), ("ÄußereTemp", "äußere_temp"),
])
def test_snake_case(browse_name: str, expected: str) -> None:
    assert snake_case(browse_name) == expected


def test_point_names_are_unique_even_when_a_suffix_is_taken() -> None:
    assert point_names("plc", ["Temp", "Temp", "Temp_2", "temp"]) == ["plc.temp", "plc.temp_2", "plc.temp_2_2",
                                                                      "plc.temp_3"]


def test_every_command_starts_without_importing_the_protocol_libraries() -> None:
    # Building the parser is part of every command (and of `--version` on a host without asyncua,
    # which the install test runs): the commissioning help must not pull asyncua or pymodbus in.
    import subprocess
    import sys

    probe = ("import sys; from edge_agent import cli\n"
             "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('asyncua', 'pymodbus') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
