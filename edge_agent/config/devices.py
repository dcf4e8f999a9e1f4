"""Validation of ``[[devices]]`` and their ``[[devices.points]]`` (OPC UA, Modbus TCP and RTU)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

from edge_agent.config.schema import (
    _NODE_ID,
    BYTE_ORDERS,
    MODBUS_CONNECTIONS,
    OPCUA_MODES,
    OPCUA_SECURITY,
    PARITIES,
    PROTOCOLS,
    REGISTER_WIDTH,
    REGISTERS,
    TYPES,
    WORD_ORDERS,
    DeviceConfig,
    ModbusDevice,
    ModbusPoint,
    OpcUaDevice,
    OpcUaPoint,
)
from edge_agent.config.table import REQUIRED as _REQUIRED
from edge_agent.config.table import Table, _show


def _common_point(t: Table) -> dict[str, Any]:
    point: dict[str, Any] = {
        "name": t.string("name", _REQUIRED),
        "unit": t.string("unit", ""),
        "writable": t.boolean("writable", False),
        "min": t.number("min"),
        "max": t.number("max"),
        "max_step": t.number("max_step", positive=True),
        "min_interval": t.duration("min_interval", "0s", positive=False, high="365d"),
        "deadband": t.number("deadband", 0.0, low=0.0),
    }
    if point["writable"]:
        for bound in ("min", "max"):
            if point[bound] is None and not t.has(bound):
                t.problem(bound, "required when writable = true, expected a number")
    if point["min"] is not None and point["max"] is not None and point["min"] >= point["max"]:
        t.problem("max", f"expected a number above min ({point['min']:g}), got {point['max']:g}")
    return point


def _opcua_point(t: Table) -> OpcUaPoint | None:
    point = _common_point(t)
    node = t.string("node", _REQUIRED)
    if node is not None and not _NODE_ID.match(node):
        t.problem("node", f'expected a node id like "ns=1;s=Name", "nsu=urn:x;i=42" or "i=2258", got "{node}"')
        node = None
    t.finish()
    if node is None or None in (point["name"],):
        return None
    return OpcUaPoint(node=node, **point)


def _modbus_point(t: Table) -> ModbusPoint | None:
    point = _common_point(t)
    register = t.choice("register", REGISTERS, "holding")
    address = t.integer("address", _REQUIRED, low=0, high=65535)
    bit_table = register in ("coil", "discrete")
    kind = t.choice("type", TYPES, "bool" if bit_table else "uint16")
    if bit_table and kind not in (None, "bool"):
        t.problem("type", f'expected "bool" for register = "{register}", got "{kind}"')
        kind = None
    if register in ("holding", "input") and kind == "bool":
        t.problem("type", f'expected a numeric type for register = "{register}", got "bool"')
        kind = None
    if point["writable"] and register in ("input", "discrete"):
        t.problem("writable", f'register = "{register}" is read-only, expected holding or coil')
    if address is not None and kind is not None and address + REGISTER_WIDTH[kind] > 65536:
        t.problem("address", f"expected the {kind} to end at or below register 65535, starts at {address}")
        address = None
    extra = {
        "word_order": t.choice("word_order", WORD_ORDERS, "big"),
        "byte_order": t.choice("byte_order", BYTE_ORDERS, "big"),
        "scale": t.number("scale", 1.0),
        "offset": t.number("offset", 0.0),
    }
    if extra["scale"] == 0.0:
        t.problem("scale", "expected a non-zero number, got 0")
        extra["scale"] = None
    if kind == "bool" and extra["byte_order"] == "little":
        t.problem("byte_order", f'applies to register values, not to bool points in the {register} table')
        extra["byte_order"] = None
    t.finish()
    if None in (point["name"], register, address, kind, *extra.values()):
        return None
    return ModbusPoint(register=register, address=address, type=kind, **extra, **point)


def _common_device(t: Table, protocol: str) -> dict[str, Any]:
    device = {
        "name": t.string("name", _REQUIRED),
        "protocol": protocol,
        "interval": t.duration("interval", "1s", high="1d"),
        "timeout": t.duration("timeout", "3s", high="1h"),
        "retry_min": t.duration("retry_min", "1s", high="1d"),
        "retry_max": t.duration("retry_max", "60s", high="1d"),
    }
    if device["retry_min"] and device["retry_max"] and device["retry_min"] > device["retry_max"]:
        t.problem("retry_max", "expected a duration at least retry_min")
    return device


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def _server_certificate(t: Table, base: Path | None, security: str | None) -> Path | None:
    """``server_certificate``: a readable PEM or DER certificate file, only with a Basic256Sha256 mode."""
    text = t.string("server_certificate")
    if text is None:
        return None
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = (base / path).resolve()
    if security == "None":
        t.problem("server_certificate", 'pins the certificate of a secure channel, expected security = '
                                        '"Basic256Sha256,Sign" or "Basic256Sha256,SignAndEncrypt" with it')
        return None
    try:
        head = path.read_bytes()[:4096]
    except OSError as exc:
        t.problem("server_certificate", f"expected a readable PEM or DER certificate file, cannot read {path}: "
                                        f"{exc.strerror or exc}")
        return None
    # A full parse happens at connect (drivers/opcua_pki.py); here only the shape of the file.
    if _PEM_CERTIFICATE not in head and not head.startswith(b"\x30"):
        t.problem("server_certificate", f"expected a PEM (-----BEGIN CERTIFICATE-----) or DER certificate, "
                                        f"{path} is neither")
        return None
    return path


def _opcua_device(t: Table, device: dict[str, Any], base: Path | None = None) -> OpcUaDevice | None:
    endpoint = t.string("endpoint", _REQUIRED)
    if endpoint is not None and not endpoint.startswith("opc.tcp://"):
        t.problem("endpoint", f'expected an URL starting with "opc.tcp://", got "{endpoint}"')
        endpoint = None
    extra = {
        "mode": t.choice("mode", OPCUA_MODES, "subscribe"),
        "security": t.choice("security", OPCUA_SECURITY, "None"),
        "username": t.string("username"),
        "password": t.string("password"),
    }
    if extra["password"] is not None and extra["username"] is None:
        t.problem("password", "given without username")
    pinned = t.has("server_certificate")
    extra["server_certificate"] = _server_certificate(t, base, extra["security"])
    points = [_opcua_point(p) for p in t.tables("points")]
    t.finish()
    if None in (endpoint, extra["mode"], extra["security"], *device.values()) or None in points:
        return None
    if pinned and extra["server_certificate"] is None:
        return None
    return OpcUaDevice(endpoint=endpoint, points=tuple(points), **extra, **device)  # type: ignore[arg-type]


MAX_IN_FLIGHT = 16  # requests of one read on the wire at once (Modbus TCP)


def _modbus_device(t: Table, device: dict[str, Any]) -> ModbusDevice | None:
    rtu = device["protocol"] == "modbus-rtu"
    extra: dict[str, Any] = {
        "unit_id": t.integer("unit_id", 1, low=0, high=255),
        "max_registers": t.integer("max_registers", 125, low=1, high=125),
        "max_gap": t.integer("max_gap", 0, low=0, high=124),
    }
    if rtu:
        extra |= {
            "serial_port": t.string("serial_port", _REQUIRED),
            "baudrate": t.integer("baudrate", 19200, low=300, high=4_000_000),
            "parity": t.choice("parity", PARITIES, "E"),
            "stopbits": t.integer("stopbits", 1, low=1, high=2),
            "bytesize": t.integer("bytesize", 8, low=7, high=8),
        }
        if t.has("requests_in_flight"):
            t.seen.add("requests_in_flight")
            t.problem("requests_in_flight", "Modbus TCP only (protocol = \"modbus\"): a serial line carries one "
                                            "request at a time")
    else:
        extra |= {"host": t.string("host", _REQUIRED), "port": t.integer("port", 502, low=1, high=65535),
                  "connection": t.choice("connection", MODBUS_CONNECTIONS, "own"),
                  "requests_in_flight": t.integer("requests_in_flight", 1, low=1, high=MAX_IN_FLIGHT)}
    points = [_modbus_point(p) for p in t.tables("points")]
    t.finish()
    if None in extra.values() or None in device.values() or None in points:
        return None
    built = ModbusDevice(points=tuple(points), **extra, **device)  # type: ignore[arg-type]
    _check_overlaps(built, t)
    return built


def _check_overlaps(device: ModbusDevice, t: Table) -> None:
    by_table: dict[str, list[tuple[int, int, int]]] = {}
    for index, point in enumerate(device.points):
        by_table.setdefault(point.register, []).append((point.address, point.address + point.width, index))
    for register, spans in by_table.items():
        spans.sort()
        for (start_a, end_a, index_a), (start_b, _end_b, index_b) in pairwise(spans):
            if start_b < end_a:
                a, b = device.points[index_a], device.points[index_b]
                t.problems.append(
                    f"{t.path}.points[{index_b}].address: {register} register {start_b} of "
                    f'"{b.name}" overlaps "{a.name}" (registers {start_a}..{end_a - 1})')


def devices(root: Table, base: Path | None = None) -> list[DeviceConfig]:
    """Every ``[[devices]]`` entry; relative file names (``server_certificate``) resolve against ``base``."""
    devices: list[DeviceConfig] = []
    for t in root.tables("devices"):
        protocol = t.choice("protocol", PROTOCOLS, _REQUIRED)
        common = _common_device(t, protocol)
        if protocol == "opcua":
            built: DeviceConfig | None = _opcua_device(t, common, base)
        elif protocol in ("modbus", "modbus-rtu"):
            built = _modbus_device(t, common)
        else:
            t.tables("points")
            t.finish(allow=t.raw.keys())
            built = None
        if built is not None:
            devices.append(built)
    _check_shared_serial_ports(root)
    return devices


_SERIAL_SETTINGS = (("baudrate", 19200), ("parity", "E"), ("stopbits", 1), ("bytesize", 8))


def _check_shared_serial_ports(root: Table) -> None:
    """Devices on one serial port share the line (drivers/modbus_link.py): they must agree on its settings."""
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    listed = root.raw.get("devices", [])
    if not isinstance(listed, list):  # reported as a problem where [[devices]] is read
        return
    for index, raw in enumerate(listed):
        if not isinstance(raw, dict) or raw.get("protocol") != "modbus-rtu":
            continue
        if not isinstance(raw.get("serial_port"), str):
            continue
        settings = {key: raw.get(key, default) for key, default in _SERIAL_SETTINGS}
        port = raw["serial_port"]
        if port not in first:
            first[port] = (index, settings)
            continue
        other, expected = first[port]
        for key, _default in _SERIAL_SETTINGS:
            if settings[key] != expected[key]:
                root.problems.append(
                    f"devices[{index}].{key}: devices on serial port {port} share the line, expected "
                    f"{_show(expected[key])} as devices[{other}] has, got {_show(settings[key])}")


def check_names(root: Table, devices: list[DeviceConfig]) -> None:
    seen_devices: dict[str, int] = {}
    seen_points: dict[str, str] = {}
    listed = root.raw.get("devices", [])
    for d_index, device in enumerate(listed if isinstance(listed, list) else []):  # else: reported by devices()
        if not isinstance(device, dict):
            continue
        name = device.get("name")
        if isinstance(name, str):
            if name in seen_devices:
                root.problems.append(
                    f'devices[{d_index}].name: duplicate device name "{name}" (also devices[{seen_devices[name]}])')
            seen_devices.setdefault(name, d_index)
        for p_index, point in enumerate(device.get("points", []) if isinstance(device.get("points"), list) else []):
            pname = point.get("name") if isinstance(point, dict) else None
            if not isinstance(pname, str):
                continue
            where = f"devices[{d_index}].points[{p_index}]"
            if pname in seen_points:
                root.problems.append(
                    f'{where}.name: duplicate point name "{pname}" (also {seen_points[pname]})')
            seen_points.setdefault(pname, where)
