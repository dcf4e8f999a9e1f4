"""OPC UA driver against a real asyncua Server on a free loopback port (no mocks)."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
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
from asyncua.common.callback import CallbackType
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers import driver_class, opcua_pki
from drivers.base import BAD, GOOD, UNCERTAIN, Reading
from drivers.opcua import OpcUaDriver, coerce, exact_value, keepalive_period, plain
from edge_agent.config import OpcUaDevice, OpcUaPoint
from edge_agent.device import DeviceRunner
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
                validator: Callable[..., Any] | None = None, port: int | None = None) -> AsyncIterator[Plant]:
    """Start a server; with ``certificate`` (DER, PEM key) it offers only Basic256Sha256 SignAndEncrypt.

    ``port``: listen there (a restarted server, or another one on the same endpoint) instead of a free port.
    """
    server = Server(user_manager=users)
    await server.init()
    server.disable_clock()  # its 1 s loop would make stop() wait a second
    endpoint = f"opc.tcp://127.0.0.1:{port or free_port()}/edge-test/"
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
    settings: dict[str, Any] = {"interval": 0.1, "timeout": 2.0, **extra}
    return OpcUaDevice(name="plc1", protocol="opcua", endpoint=endpoint, points=tuple(points), **settings)


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


async def test_a_string_that_is_not_utf8_on_the_wire_reads_with_replacement_characters(tmp_path: Path) -> None:
    """An old PLC's Latin-1 "\u00b0C" in an OPC UA String: asyncua decodes the bytes that are not
    UTF-8 as lone surrogates, which SQLite refuses (it stopped the twin writer); the driver hands
    on U+FFFD instead, the rest of the text as it came."""
    latin1 = b"\xb0C 20\xb5m".decode("utf-8", "surrogateescape")  # asyncua's server sends these bytes as they are
    async with plant() as p:
        line = p.server.get_node(ua.NodeId("Line1", p.ns))
        await line.add_variable(ua.NodeId("Line1.Label", p.ns), "Label", ua.Variant(latin1, ua.VariantType.String))
        driver = OpcUaDriver(device(p.endpoint, [point("label", p.node_id("Label")), point("temp", p.node_id("Temp"))],
                                    mode="poll"), tmp_path)
        async with driver:
            got = by_point(await driver.read())
    assert got["label"].value == "\ufffdC 20\ufffdm" and got["label"].quality == GOOD
    assert got["temp"].value == 21.5


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


@functools.cache
def _server_certificate(which: int = 0) -> tuple[bytes, bytes]:
    """Server certificate and key number ``which`` (made once per test session: RSA keys take a while)."""
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


# --------------------------------------------------------------------------- server certificate trust (issue 14)


def _thumbprint(certificate: tuple[bytes, bytes]) -> str:
    return opcua_pki.thumbprint(certificate[0])


class Witness(UserManager):
    """Accepts "operator"/"s3cret" like OneOperator, and remembers every password it was handed."""

    def __init__(self) -> None:
        self.passwords: list[str | None] = []

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        self.passwords.append(password)
        return User(role=UserRole.User) if (username, password) == ("operator", "s3cret") else None


async def test_server_certificate_is_trusted_on_first_use_and_a_swapped_one_is_refused(tmp_path: Path) -> None:
    genuine, impostor = _server_certificate(1), _server_certificate(2)
    sessions: list[tuple[str, list[str]]] = []

    async def record(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sessions.append((app.ApplicationUri, san.get_values_for_type(x509.UniformResourceIdentifier)))

    port = free_port()
    trusted = tmp_path / "pki" / "trusted" / f"127.0.0.1_{port}.der"
    rejected = tmp_path / "pki" / "rejected" / f"127.0.0.1_{port}.der"

    async with plant(certificate=genuine, port=port, users=OneOperator(), validator=record) as p:
        config = device(p.endpoint, [point("temp", p.node_id("Temp"))], security="Basic256Sha256,SignAndEncrypt",
                        username="operator", password="s3cret")
        async with OpcUaDriver(config, tmp_path) as driver:
            assert (await driver.read())[0].value == 21.5
    assert trusted.read_bytes() == genuine[0]  # the first certificate, kept
    # The client's ApplicationUri in CreateSession is the URI in its certificate's SubjectAltName
    # (servers refuse a mismatch with BadCertificateUriInvalid: ThingsBoard IoT Gateway #1677).
    assert sessions == [(opcua_pki.application_uri(), [opcua_pki.application_uri()])]

    witness = Witness()
    async with plant(certificate=impostor, port=port, users=witness):  # same endpoint, another key
        driver = OpcUaDriver(config, tmp_path)
        with pytest.raises(ConnectError) as refused:
            await driver.connect()
        await driver.close()
        assert witness.passwords == []  # the password never left the agent
    message = str(refused.value)
    assert message.startswith(f'device "plc1": the server at {config.endpoint} presented certificate '
                              f"SHA-1 {_thumbprint(impostor)}")
    assert f"but SHA-1 {_thumbprint(genuine)}" in message and f"trusted on first use, kept in {trusted}" in message
    assert f'pin it with devices[].server_certificate = "{rejected}", or delete {trusted}' in message
    assert rejected.read_bytes() == impostor[0]  # the refused one, ready to pin
    assert trusted.read_bytes() == genuine[0]  # still the genuine one

    trusted.unlink()  # the operator accepts the change: the next certificate is trusted on first use
    async with plant(certificate=impostor, port=port, users=OneOperator()), OpcUaDriver(config, tmp_path) as driver:
        assert (await driver.read())[0].value == 21.5
    assert trusted.read_bytes() == impostor[0]


async def test_a_pinned_server_certificate_overrides_the_one_trusted_on_first_use(tmp_path: Path) -> None:
    old, new = _server_certificate(1), _server_certificate(2)
    port = free_port()
    pinned = tmp_path / "plc1-server.pem"
    pinned.write_bytes(x509.load_der_x509_certificate(new[0]).public_bytes(serialization.Encoding.PEM))

    async with plant(certificate=old, port=port) as p:  # trusted on first use: old
        tofu = device(p.endpoint, [point("temp", p.node_id("Temp"))], security="Basic256Sha256,SignAndEncrypt")
        async with OpcUaDriver(tofu, tmp_path) as driver:
            assert (await driver.read())[0].quality == GOOD
        pinning = device(p.endpoint, [point("temp", p.node_id("Temp"))], security="Basic256Sha256,SignAndEncrypt",
                         server_certificate=pinned)
        with pytest.raises(ConnectError, match=rf"presented certificate SHA-1 {_thumbprint(old)} .* but SHA-1 "
                                               rf"{_thumbprint(new)} .* is expected \(pinned in {pinned}\)"):
            await OpcUaDriver(pinning, tmp_path).connect()

    async with plant(certificate=new, port=port) as p:  # the pin wins over the trusted (old) certificate
        async with OpcUaDriver(pinning, tmp_path) as driver:
            assert (await driver.read())[0].value == 21.5
        with pytest.raises(ConnectError, match="trusted on first use"):  # without the pin: refused
            await OpcUaDriver(tofu, tmp_path).connect()


async def test_a_refused_server_certificate_makes_the_device_go_down_loudly(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    genuine, impostor = _server_certificate(1), _server_certificate(2)
    port = free_port()
    async with plant(certificate=genuine, port=port) as p:
        config = device(p.endpoint, [point("temp", p.node_id("Temp"))], security="Basic256Sha256,SignAndEncrypt",
                        retry_min=0.1, retry_max=0.2, mode="poll")
        async with OpcUaDriver(config, tmp_path):
            pass  # trusted on first use
    latest: dict[str, Reading] = {"temp": Reading("temp", 21.5, GOOD, 0.0)}
    events: list[dict[str, Any]] = []
    runner = DeviceRunner(config, tmp_path, lambda rs: latest.update((r.point, r) for r in rs), latest.get,
                          on_event=events.append)
    async with plant(certificate=impostor, port=port):
        task = asyncio.create_task(runner.run())
        try:
            await wait_for(lambda: runner.status.failures >= 2, timeout=20, what="two refused connects")
        finally:
            runner.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert runner.status.state == "down"
    for text in (runner.status.last_error, events[0]["message"]):
        assert f"presented certificate SHA-1 {_thumbprint(impostor)}" in text
        assert f"but SHA-1 {_thumbprint(genuine)}" in text and "delete" in text
    assert [e["state"] for e in events] == ["down"]  # one event, not one per retry
    assert latest["temp"] == Reading("temp", 21.5, BAD, latest["temp"].ts)  # last value kept, quality bad
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "presented certificate" in r.getMessage()]
    assert len(warnings) == 1  # first failure WARNING, repeats DEBUG


# --------------------------------------------------------------------------- recovery that recovers (issue 14)


@asynccontextmanager
async def supervised(config: OpcUaDevice, tmp_path: Path) -> AsyncIterator[tuple[DeviceRunner, dict[str, Reading]]]:
    """The agent's device supervisor running the real driver; yields it and the latest reading per point."""
    latest: dict[str, Reading] = {}
    runner = DeviceRunner(config, tmp_path, lambda rs: latest.update((r.point, r) for r in rs), latest.get)
    task = asyncio.create_task(runner.run())
    try:
        yield runner, latest
    finally:
        runner.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def flowing(latest: dict[str, Reading], name: str, value: Any) -> bool:
    reading_ = latest.get(name)
    return reading_ is not None and reading_.value == value and reading_.quality == GOOD


def sessions_of(p: Plant) -> list[Any]:
    # asyncua has no public list of a server's sessions; its internal server keeps them by token.
    return list(p.server.iserver._external_sessions.values())


async def test_values_flow_again_after_a_server_restart_on_the_same_port(tmp_path: Path) -> None:
    port = free_port()
    async with plant(port=port) as p:
        config = device(p.endpoint, [point("count", p.node_id("Count"))], retry_min=0.1, retry_max=0.5)
        async with supervised(config, tmp_path) as (runner, latest):
            await wait_for(lambda: flowing(latest, "count", -7), what="values before the restart")
            await p.stop()
            await wait_for(lambda: runner.status.state == "down", what="the outage seen")
            async with plant(port=port) as restarted:
                await restarted.set("Count", ua.DataValue(ua.Variant(41, ua.VariantType.Int32)))
                await wait_for(lambda: flowing(latest, "count", 41), timeout=20, what="values after the restart")
                await restarted.set("Count", ua.DataValue(ua.Variant(42, ua.VariantType.Int32)))
                await wait_for(lambda: flowing(latest, "count", 42), what="changes after the restart")
                assert runner.status.state == "up"


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_values_flow_again_after_the_server_closes_the_session(mode: str, tmp_path: Path) -> None:
    async with plant() as p:
        config = device(p.endpoint, [point("count", p.node_id("Count"))], mode=mode, retry_min=0.1, retry_max=0.5)
        async with supervised(config, tmp_path) as (runner, latest):
            await wait_for(lambda: flowing(latest, "count", -7), what="values before")
            [session] = sessions_of(p)
            await session.close_session()  # the server ends it (timeout, admin, restart of its session layer)
            await wait_for(lambda: runner.status.read_errors >= 1, what="the closed session seen")
            await p.set("Count", ua.DataValue(ua.Variant(5, ua.VariantType.Int32)))
            await wait_for(lambda: flowing(latest, "count", 5), timeout=20, what="values in a new session")
            assert [s for s in sessions_of(p) if s is not session]  # a fresh session


async def test_values_flow_again_after_the_server_deletes_the_subscription(tmp_path: Path) -> None:
    async with plant() as p:
        config = device(p.endpoint, [point("count", p.node_id("Count"))], timeout=0.5, retry_min=0.1, retry_max=0.5)
        async with supervised(config, tmp_path) as (runner, latest):
            await wait_for(lambda: flowing(latest, "count", -7), what="values before")
            subscriptions = p.server.iserver.subscription_service
            [lost] = list(subscriptions.subscriptions)
            await subscriptions.delete_subscriptions([lost])  # dropped by the server: the session lives on
            await p.set("Count", ua.DataValue(ua.Variant(6, ua.VariantType.Int32)))
            await wait_for(lambda: flowing(latest, "count", 6), timeout=10, what="values in a new subscription")
            assert runner.status.read_errors >= 1 and "no longer has subscription" in runner.status.last_error
            assert list(subscriptions.subscriptions) != [lost]


async def test_data_counts_as_keep_alive_on_a_busy_subscription(tmp_path: Path) -> None:
    """A server sends no keep-alive while it sends data (OPC 10000-4 §5.13.1): a client that waits for
    keep-alives only declares a busy subscription dead (HiveMQ Edge #1303)."""
    batches: list[list[Reading]] = []
    async with plant() as p:
        # interval 0.1 s: keep-alive every 1 s, so without data for 3 s + timeout the subscription is dead
        config = device(p.endpoint, [point("count", p.node_id("Count"))], timeout=0.5)
        assert keepalive_period(config.interval) == 1.0
        async with OpcUaDriver(config, tmp_path) as driver:
            await driver.subscribe(lambda batch: batches.append(list(batch)))
            loop = asyncio.get_running_loop()
            started = loop.time()
            value = 0
            while loop.time() - started < 4.0:  # longer than 3 keep-alive periods + timeout (3.5 s)
                value += 1
                await p.set("Count", ua.DataValue(ua.Variant(value, ua.VariantType.Int32)))
                await asyncio.sleep(0.05)
                await driver.check()  # raises if the subscription counted as silent
            await wait_for(lambda: any(r.value == value for b in batches for r in b), what="the last value")
    assert len({r.value for b in batches for r in b}) > 20


# --------------------------------------------------------------------------- nodes that vanish (issue 14)


async def vanish(p: Plant, name: str) -> None:
    """Delete a variable as a compliant server would: monitored items on it get BadNodeIdUnknown.

    asyncua 2.1 deletes the node without notifying them (its delete callback is a coroutine that is
    never awaited), so the notification is sent first by writing that status to the node.
    """
    await p.set(name, ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)))
    await p.server.delete_nodes([p.nodes[name]])


async def reappear(p: Plant, name: str, value: Any, kind: ua.VariantType) -> None:
    line = p.server.get_node(ua.NodeId("Line1", p.ns))
    p.nodes[name] = await line.add_variable(ua.NodeId(f"Line1.{name}", p.ns), name, ua.Variant(value, kind))


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")  # asyncua's delete_nodes
@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_a_node_that_vanishes_reads_bad_and_comes_back_while_the_others_flow(mode: str,
                                                                                  tmp_path: Path) -> None:
    async with plant() as p:
        points = [point("temp", p.node_id("Temp")), point("count", p.node_id("Count")),
                  point("later", f"ns={p.ns};s=Line1.Later")]  # not there yet
        config = device(p.endpoint, points, mode=mode, retry_min=0.1, retry_max=0.4)
        async with supervised(config, tmp_path) as (runner, latest):
            await wait_for(lambda: flowing(latest, "count", -7) and latest.get("later") is not None,
                           what="first values")
            assert (latest["later"].value, latest["later"].quality) == (None, BAD)

            await vanish(p, "Count")
            await wait_for(lambda: latest["count"].quality == BAD, what="count bad")
            await p.set("Temp", ua.DataValue(ua.Variant(30.0, ua.VariantType.Double)))
            await wait_for(lambda: flowing(latest, "temp", 30.0), what="temp still flowing")

            await reappear(p, "Count", 77, ua.VariantType.Int32)
            await reappear(p, "Later", 1.25, ua.VariantType.Double)
            await wait_for(lambda: flowing(latest, "count", 77) and flowing(latest, "later", 1.25), timeout=15,
                           what="both nodes back")
            await p.set("Count", ua.DataValue(ua.Variant(78, ua.VariantType.Int32)))
            await wait_for(lambda: flowing(latest, "count", 78), what="changes of the re-created node")
            assert runner.status.state == "up" and runner.status.read_errors == 0  # the device never went down


# --------------------------------------------------------------------------- operation limits (issue 14)


class Limits:
    """Makes a plant's server advertise and enforce OperationLimits, like a PLC with small ones:
    a Read or CreateMonitoredItems with more operations than allowed is refused with BadTooManyOperations.
    ``advertise=False`` enforces without advertising (the server's nodes say 0, no limit)."""

    def __init__(self, p: Plant, read: int, monitor: int, *, advertise: bool = True) -> None:
        self.plant, self.read, self.monitor = p, read, monitor
        self.reads: list[int] = []
        self.monitors: list[int] = []
        self.refused = 0
        self.advertise = advertise

    async def install(self) -> None:
        limits = ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead, \
            ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall
        for node_id, value in zip(limits, (self.read, self.monitor), strict=True):
            await self.plant.server.write_attribute_value(
                ua.NodeId(node_id), ua.DataValue(ua.Variant(value if self.advertise else 0, ua.VariantType.UInt32)))
        self.plant.server.subscribe_server_callback(CallbackType.PreRead, self._pre_read)
        self.plant.server.subscribe_server_callback(CallbackType.ItemSubscriptionCreated, self._created)

    def _pre_read(self, event: Any, _dispatcher: Any) -> None:
        if event.is_external:
            nodes = event.request_params.NodesToRead
            if any(n.NodeId.NamespaceIndex == self.plant.ns for n in nodes):  # the points, not the watchdog's
                self.reads.append(len(nodes))
            if len(nodes) > self.read:
                self.refused += 1
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)

    def _created(self, event: Any, _dispatcher: Any) -> None:
        params = event.request_params
        if event.is_external:
            self.monitors.append(len(params.ItemsToCreate))
            if len(params.ItemsToCreate) > self.monitor:
                # The check runs after the server created the items: take them back, then refuse.
                self.refused += 1
                ids = [r.MonitoredItemId for r in event.response_params if r.StatusCode.is_good()]
                self.plant.server.iserver.subscription_service.delete_monitored_items(
                    ua.DeleteMonitoredItemsParameters(SubscriptionId=params.SubscriptionId, MonitoredItemIds=ids))
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)


@pytest.mark.parametrize("advertise", [True, False], ids=["advertised", "unadvertised"])
@pytest.mark.parametrize("mode", ["poll", "subscribe"])
async def test_requests_are_split_to_fit_the_server_operation_limits(mode: str, advertise: bool,
                                                                     tmp_path: Path) -> None:
    names = [n for n in VARIABLES if n not in ("Broken", "Doubtful")]  # 6 good points
    batches: list[list[Reading]] = []
    async with plant() as p:
        limits = Limits(p, read=4, monitor=3, advertise=advertise)
        await limits.install()
        points = [point(n.lower(), p.node_id(n)) for n in names]
        async with OpcUaDriver(device(p.endpoint, points, mode=mode), tmp_path) as driver:
            if mode == "poll":
                got = {r.point: r for r in await driver.read()}
                again = {r.point: r for r in await driver.read()}
                assert again.keys() == got.keys()
            else:
                await driver.subscribe(lambda batch: batches.append(list(batch)))
                got = await wait_for(lambda: {r.point: r for b in batches for r in b}
                                     if len({r.point for b in batches for r in b}) == len(names) else None,
                                     what="every point's first value")
    assert {name: r.quality for name, r in got.items()} == {n.lower(): GOOD for n in names}
    assert got["count"].value == -7
    if mode == "poll":  # two reads of 6 points, at most 4 per request
        assert limits.reads == ([4, 2, 4, 2] if advertise else [6, 3, 3, 3, 3])
    else:  # 6 monitored items, at most 3 per request
        assert limits.monitors == ([3, 3] if advertise else [6, 3, 3])
    assert limits.refused == (0 if advertise else 1)  # refused once at most: then halved, and it stays so
