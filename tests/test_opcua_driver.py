"""OPC UA driver against a real asyncua Server on a free loopback port (no mocks)."""

from __future__ import annotations

import datetime as dt
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asyncua import Node, Server, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers import driver_class, opcua_pki
from drivers.base import BAD, GOOD, UNCERTAIN, Reading
from drivers.opcua import OpcUaDriver, coerce, exact_value, plain
from edge_agent.config import OpcUaDevice, OpcUaPoint
from edge_agent.errors import ConnectError, ReadError, WriteError
from tests.helpers import free_port, wait_for

NS_URI = "urn:edge-agent:test-plant"
SOURCE_TS = dt.datetime(2024, 5, 17, 8, 30, 15, 250000, tzinfo=dt.UTC)

# name -> (initial value, variant type, writable on the server, DataType when not the variant's own)
VARIABLES: dict[str, tuple[Any, ua.VariantType, bool, int | None]] = {
    "Temp": (21.5, ua.VariantType.Double, True, None),
    "Ratio": (0.5, ua.VariantType.Float, True, None),
    "Count": (-7, ua.VariantType.Int32, True, None),
    "Speed": (1200, ua.VariantType.UInt16, False, None),
    "Running": (True, ua.VariantType.Boolean, True, None),
    "Level": (1.5, ua.VariantType.Float, True, ua.ObjectIds.Number),  # abstract DataType
    "Broken": (0.0, ua.VariantType.Double, False, None),
    "Doubtful": (3.0, ua.VariantType.Double, False, None),
}


@dataclass
class Plant:
    """A running asyncua server with one variable per entry of VARIABLES under ns=<ns>;s=Line1.<Name>."""

    server: Server
    endpoint: str
    ns: int
    nodes: dict[str, Node] = field(default_factory=dict)
    running: bool = True

    def node_id(self, name: str) -> str:
        return f"ns={self.ns};s=Line1.{name}"

    def value(self, name: str) -> ua.DataValue:
        return self.server.read_attribute_value(self.nodes[name].nodeid)

    async def set(self, name: str, data: ua.DataValue) -> None:
        await self.server.write_attribute_value(self.nodes[name].nodeid, data)

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.server.stop()


@asynccontextmanager
async def plant(*, certificate: tuple[bytes, bytes] | None = None, users: UserManager | None = None,
                validator: Callable[..., Any] | None = None) -> AsyncIterator[Plant]:
    """Start a server; with ``certificate`` (DER, PEM key) it offers only Basic256Sha256 SignAndEncrypt."""
    server = Server(user_manager=users)
    await server.init()
    server.disable_clock()  # its 1 s loop would make stop() wait a second
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/edge-test/"
    server.set_endpoint(endpoint)
    if certificate is None:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    else:
        await server.set_application_uri("urn:edge-agent:test-server")
        await server.load_certificate(certificate[0], format="der")
        await server.load_private_key(certificate[1], format="pem")
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    if validator is not None:
        server.set_certificate_validator(validator)
    ns = await server.register_namespace(NS_URI)
    line = await server.nodes.objects.add_object(ua.NodeId("Line1", ns), "Line1")
    result = Plant(server, endpoint, ns)
    for name, (value, kind, writable, datatype) in VARIABLES.items():
        node = await line.add_variable(ua.NodeId(f"Line1.{name}", ns), name, ua.Variant(value, kind),
                                       datatype=None if datatype is None else ua.NodeId(datatype))
        if writable:
            await node.set_writable()
        result.nodes[name] = node
    await result.set("Temp", ua.DataValue(ua.Variant(21.5, ua.VariantType.Double), SourceTimestamp=SOURCE_TS))
    await result.set("Broken", ua.DataValue(
        ua.Variant(0.0, ua.VariantType.Double), StatusCode=ua.StatusCode(ua.StatusCodes.BadSensorFailure)))
    await result.set("Doubtful", ua.DataValue(
        ua.Variant(3.0, ua.VariantType.Double),
        StatusCode=ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)))
    await server.start()
    try:
        yield result
    finally:
        await result.stop()


def device(endpoint: str, points: list[OpcUaPoint], **extra: Any) -> OpcUaDevice:
    """An OPC UA device config as config.load would build it."""
    return OpcUaDevice(name="plc1", protocol="opcua", endpoint=endpoint, interval=0.1, timeout=2.0,
                       points=tuple(points), **extra)


def point(name: str, node: str, writable: bool = False) -> OpcUaPoint:
    bounds = {"min": -1e6, "max": 1e6} if writable else {}
    return OpcUaPoint(name=name, node=node, writable=writable, **bounds)


def all_points(p: Plant) -> list[OpcUaPoint]:
    """Every variable, Speed through its nsu= form, plus a node id the server does not have."""
    points = [point(name.lower(), p.node_id(name), writable=VARIABLES[name][2])
              for name in VARIABLES if name != "Speed"]
    # writable in the config but not on the server: the server refuses the write
    points.append(point("speed", f"nsu={NS_URI};s=Line1.Speed", writable=True))
    points.append(point("missing", f"ns={p.ns};s=Line1.NoSuchThing"))
    return points


def by_point(readings: list[Reading]) -> dict[str, Reading]:
    return {r.point: r for r in readings}


# --------------------------------------------------------------------------- poll, resolve


async def test_poll_read_values_qualities_and_nsu_node_ids(tmp_path: Path) -> None:
    async with plant() as p:
        driver = OpcUaDriver(device(p.endpoint, all_points(p), mode="poll"), tmp_path)
        async with driver:
            got = by_point(await driver.read())

            unknown = OpcUaDriver(device(p.endpoint, [point("x", "nsu=urn:nobody:here;s=Line1.Temp")]),
                                  tmp_path)
            with pytest.raises(ConnectError, match=r'point "x".*urn:nobody:here'):
                await unknown.connect()
            await unknown.close()

    assert got["temp"] == Reading("temp", 21.5, GOOD, SOURCE_TS.timestamp())
    assert (got["ratio"].value, got["ratio"].quality) == (0.5, GOOD)
    assert (got["count"].value, got["count"].quality) == (-7, GOOD)
    assert (got["speed"].value, got["speed"].quality) == (1200, GOOD)  # resolved from nsu=
    assert (got["running"].value, got["running"].quality) == (True, GOOD)
    assert (got["broken"].value, got["broken"].quality) == (None, BAD)
    assert got["doubtful"].quality == UNCERTAIN
    assert (got["missing"].value, got["missing"].quality) == (None, BAD)
    assert list(got) == [p.name for p in driver.device.points]  # config order, one per point


def test_registry_maps_opcua_to_this_driver() -> None:
    assert driver_class("opcua") is OpcUaDriver
    assert OpcUaDriver.supports_subscribe


async def test_connect_to_a_closed_port_raises_connect_error(tmp_path: Path) -> None:
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/nothing/"
    driver = OpcUaDriver(device(endpoint, [point("t", "ns=2;s=Line1.Temp")]), tmp_path)
    with pytest.raises(ConnectError, match=f"device \"plc1\": cannot connect to {endpoint}") as info:
        await driver.connect()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ReadError, match="not connected"):
        await driver.read()
    await driver.close()
    await driver.close()  # twice is fine, never raises


# --------------------------------------------------------------------------- subscribe, link loss


async def test_subscribe_delivers_changes_with_source_timestamp_then_detects_server_stop(
        tmp_path: Path) -> None:
    batches: list[list[Reading]] = []
    async with plant() as p:
        driver = OpcUaDriver(device(p.endpoint, all_points(p)), tmp_path)
        await driver.connect()
        await driver.subscribe(lambda batch: batches.append(list(batch)))

        # the initial values: all points, a bad one for the node the server refused to monitor
        seen = await wait_for(lambda: by_point([r for b in batches for r in b])
                              if len({r.point for b in batches for r in b}) == len(all_points(p)) else None,
                              what="initial values of every point")
        assert seen["temp"] == Reading("temp", 21.5, GOOD, SOURCE_TS.timestamp())
        assert seen["broken"].quality == BAD
        assert seen["missing"].quality == BAD
        assert seen["speed"].value == 1200
        assert max(len(b) for b in batches) >= len(VARIABLES)  # one publish response, one sink call

        changed_at = dt.datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
        await p.set("Temp", ua.DataValue(ua.Variant(42.25, ua.VariantType.Double), SourceTimestamp=changed_at))
        await p.set("Count", ua.DataValue(ua.Variant(9, ua.VariantType.Int32)))
        new = await wait_for(lambda: [r for b in batches for r in b if r.value in (42.25, 9)
                                      and r.point in ("temp", "count")] or None, what="the changes")
        assert Reading("temp", 42.25, GOOD, changed_at.timestamp()) in new
        await driver.check()  # alive

        await p.stop()
        await wait_for(lambda: _raises(driver.check, ReadError), what="check() to raise after server stop")
        with pytest.raises(ReadError, match=r"device \"plc1\": read from .* failed"):
            await driver.read()
        await driver.close()


async def _raises(call: Callable[[], Any], error: type[Exception]) -> bool:
    try:
        await call()
    except error:
        return True
    return False


# --------------------------------------------------------------------------- write


async def test_write_uses_the_node_type_and_sends_no_timestamps(tmp_path: Path) -> None:
    async with plant() as p:
        p.server.set_force_server_timestamp(False)  # keep exactly what the client sent
        async with OpcUaDriver(device(p.endpoint, all_points(p)), tmp_path) as driver:
            await driver.write("ratio", 7)
            await driver.write("count", 12.0)
            await driver.write("running", 0)
            await driver.write("temp", 18)
            await driver.write("level", 2)

            ratio, count, running, temp, level = (
                p.value(n) for n in ("Ratio", "Count", "Running", "Temp", "Level"))
            assert (ratio.Value.Value, ratio.Value.VariantType) == (7.0, ua.VariantType.Float)
            assert (count.Value.Value, count.Value.VariantType) == (12, ua.VariantType.Int32)
            assert (running.Value.Value, running.Value.VariantType) == (False, ua.VariantType.Boolean)
            assert (temp.Value.Value, temp.Value.VariantType) == (18.0, ua.VariantType.Double)
            assert (level.Value.Value, level.Value.VariantType) == (2.0, ua.VariantType.Float)
            for written in (ratio, count, running, temp, level):
                assert written.SourceTimestamp is None and written.ServerTimestamp is None

            with pytest.raises(WriteError, match=r'point "count": expected an integer .* Int32, got 2\.5'):
                await driver.write("count", 2.5)
            with pytest.raises(WriteError, match=r'point "speed": write of .* refused by the server: BadUserAccess'):
                await driver.write("speed", 5)
            with pytest.raises(WriteError, match='point "broken": is not a writable point'):
                await driver.write("broken", 1.0)
            assert p.value("Count").Value.Value == 12
            assert p.value("Speed").Value.Value == 1200

            await p.stop()
            with pytest.raises(WriteError, match='point "count": write failed'):
                await driver.write("count", 1)


def test_coerce_and_plain_values() -> None:
    assert coerce(7, ua.VariantType.Float) == 7.0
    assert coerce(3.0, ua.VariantType.UInt16) == 3
    assert coerce(True, ua.VariantType.Boolean) is True
    for value, kind in ((-1, ua.VariantType.UInt16), (70000, ua.VariantType.UInt16), ("1", ua.VariantType.Double),
                        (2, ua.VariantType.Boolean), (1e39, ua.VariantType.Float), (1, ua.VariantType.DateTime)):
        with pytest.raises(ValueError):
            coerce(value, kind)
    assert plain(ua.LocalizedText("hello")) == "hello"
    assert plain(SOURCE_TS) == SOURCE_TS.timestamp()
    assert plain(ua.NodeClass.Variable) == 2
    assert plain([1, 2]) == "[1, 2]"


def test_exact_value_is_what_the_node_will_hold() -> None:
    """What the safety gate checks: rounded to the node's integer type or to float32, kinds strict;
    and coerce() (the write's own conversion) leaves it unchanged."""
    kinds = ua.VariantType
    cases = [(2.4, kinds.Int16, 2), (2.6, kinds.UInt32, 3), (-7.5, kinds.Int32, -8),
             (0.1, kinds.Float, 0.10000000149011612), (0.1, kinds.Double, 0.1), (7, kinds.Double, 7.0),
             (True, kinds.Boolean, True)]
    for value, kind, held in cases:
        result = exact_value(value, kind)
        assert result == held and type(result) is type(held), (value, kind, result)
        assert coerce(result, kind) == result
    for value, kind, message in ((1, kinds.Boolean, "expected true or false for a Boolean node, got 1"),
                                 (True, kinds.Int16, "expected a number for a node of type Int16, got True"),
                                 ("7", kinds.Double, "expected a number for a node of type Double, got '7'"),
                                 (float("nan"), kinds.Float, "cannot write nan to a node of type Float"),
                                 (70000, kinds.UInt16, "expected an integer from 0 to 65535 for UInt16, got 70000"),
                                 (1e39, kinds.Float, "1e+39 is out of range for Float"),
                                 (1, kinds.String,
                                  "the node holds String values; only numbers and booleans are written")):
        with pytest.raises(ValueError) as info:
            exact_value(value, kind)
        assert str(info.value) == message


# --------------------------------------------------------------------------- security, users


def _server_certificate() -> tuple[bytes, bytes]:
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, "edge-agent test server", {},
        [x509.UniformResourceIdentifier("urn:edge-agent:test-server"), x509.DNSName(socket.gethostname())],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.DER), pem


async def test_sign_and_encrypt_with_a_generated_and_reused_client_certificate(tmp_path: Path) -> None:
    presented: list[x509.Certificate] = []

    async def trust_only_the_agent(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if app.ApplicationUri not in san.get_values_for_type(x509.UniformResourceIdentifier):
            raise ua.uaerrors.BadCertificateUriInvalid
        presented.append(cert)

    async with plant(certificate=_server_certificate(), validator=trust_only_the_agent) as p:
        config = device(p.endpoint, [point("temp", p.node_id("Temp"))],
                        security="Basic256Sha256,SignAndEncrypt")
        async with OpcUaDriver(config, tmp_path) as driver:
            assert (await driver.read())[0].value == 21.5
        cert_file, key_file = tmp_path / "pki" / "client_cert.der", tmp_path / "pki" / "client_key.pem"
        first = (cert_file.read_bytes(), key_file.read_bytes())
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600

        async with OpcUaDriver(config, tmp_path) as driver:
            assert (await driver.read())[0].value == 21.5
        assert (cert_file.read_bytes(), key_file.read_bytes()) == first  # reused, not regenerated

        none_only = device(p.endpoint, [point("temp", p.node_id("Temp"))])
        with pytest.raises(ConnectError, match="device \"plc1\": cannot connect"):
            await OpcUaDriver(none_only, tmp_path).connect()

    assert len(presented) == 2
    assert presented[0].public_bytes(serialization.Encoding.DER) == first[0]
    san = presented[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [opcua_pki.application_uri()]


class OneOperator(UserManager):
    """Accepts user "operator" with password "s3cret", nobody else."""

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        return User(role=UserRole.User) if (username, password) == ("operator", "s3cret") else None


async def test_username_and_password(tmp_path: Path) -> None:
    async with plant(users=OneOperator()) as p:
        points = [point("count", p.node_id("Count"))]
        async with OpcUaDriver(device(p.endpoint, points, username="operator", password="s3cret"),
                               tmp_path) as driver:
            assert (await driver.read())[0].value == -7
        wrong = OpcUaDriver(device(p.endpoint, points, username="operator", password="guess"), tmp_path)
        with pytest.raises(ConnectError, match="device \"plc1\": cannot connect"):
            await wrong.connect()


def test_client_certificate_is_reissued_for_a_new_application_uri_with_the_same_key(tmp_path: Path) -> None:
    first = opcua_pki.ensure_client_certificate(tmp_path, "urn:host-a:edge-agent", "host-a")
    key = first.key_path.read_bytes()
    again = opcua_pki.ensure_client_certificate(tmp_path, "urn:host-a:edge-agent", "host-a")
    renamed = opcua_pki.ensure_client_certificate(tmp_path, "urn:host-b:edge-agent", "host-b")
    assert again.thumbprint == first.thumbprint
    assert renamed.thumbprint != first.thumbprint
    assert renamed.key_path.read_bytes() == key
    cert = x509.load_der_x509_certificate(renamed.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:host-b:edge-agent"]
    assert san.get_values_for_type(x509.DNSName) == ["host-b"]
    assert stat.S_IMODE(os.stat(tmp_path / "pki").st_mode) == 0o700
