"""Config file: TOML parsed once into frozen dataclasses, every problem named by key path.

``load(path)`` returns an :class:`AgentConfig` or raises :class:`ConfigError` whose
``problems`` hold one line per problem, e.g.::

    agent.toml: devices[1].points[0].type: expected one of int16, uint16, ..., got "flaot32"

The file is never rewritten. Every key has a default and a commented line in
config/agent.example.toml.
"""

from __future__ import annotations

import math
import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError

PROTOCOLS = ("opcua", "modbus", "modbus-rtu")
OPCUA_MODES = ("subscribe", "poll")
OPCUA_SECURITY = ("None", "Basic256Sha256,Sign", "Basic256Sha256,SignAndEncrypt")
REGISTERS = ("holding", "input", "coil", "discrete")
TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool")
REGISTER_WIDTH = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "uint64": 4,
    "float32": 2, "float64": 4, "bool": 1,
}
WORD_ORDERS = ("big", "little")
PARITIES = ("N", "E", "O")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NODE_ID = re.compile(r"^(?:(?:ns=\d+|nsu=[^;]+);)?(?:i=\d+|s=.+|g=[0-9a-fA-F-]{36}|b=.+)$")


def parse_duration(text: str) -> float:
    """Turn "250ms", "10s", "5m", "2h" or "7d" into seconds; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True, kw_only=True)
class PointConfig:
    """One data point of a device, named uniquely across the gateway."""

    name: str
    unit: str = ""
    writable: bool = False
    min: float | None = None
    max: float | None = None
    max_step: float | None = None
    min_interval: float = 0.0
    deadband: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OpcUaPoint(PointConfig):
    """A point read from an OPC UA node (``ns=1;s=Name`` or ``nsu=urn:...;s=Name``)."""

    node: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusPoint(PointConfig):
    """A point decoded from Modbus registers: value = raw * scale + offset."""

    register: str = "holding"
    address: int
    type: str = "uint16"
    word_order: str = "big"
    scale: float = 1.0
    offset: float = 0.0

    @property
    def width(self) -> int:
        """Number of 16-bit registers (or bits, for coil/discrete) the point spans."""
        return REGISTER_WIDTH[self.type]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """Settings shared by every device, whatever its protocol."""

    name: str
    protocol: str
    interval: float = 1.0
    timeout: float = 3.0
    retry_min: float = 1.0
    retry_max: float = 60.0
    points: tuple[PointConfig, ...] = ()

    @property
    def stale_after(self) -> float:
        """Seconds without contact after which the device's points turn stale."""
        return 3 * self.interval


@dataclass(frozen=True, slots=True, kw_only=True)
class OpcUaDevice(DeviceConfig):
    """An OPC UA server."""

    endpoint: str
    mode: str = "subscribe"
    security: str = "None"
    username: str | None = None
    password: str | None = None
    points: tuple[OpcUaPoint, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusDevice(DeviceConfig):
    """A Modbus TCP device (``protocol = "modbus"``) or serial RTU device (``"modbus-rtu"``)."""

    host: str = ""
    port: int = 502
    serial_port: str = ""
    baudrate: int = 19200
    parity: str = "E"
    stopbits: int = 1
    bytesize: int = 8
    unit_id: int = 1
    max_registers: int = 125
    max_gap: int = 0
    points: tuple[ModbusPoint, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSection:
    id: str
    site: str = "default"
    data_dir: Path
    log_level: str = "info"
    log_format: str = "text"


@dataclass(frozen=True, slots=True, kw_only=True)
class TwinSection:
    file: str = "twin.db"
    history_retention: float = 7 * 86400.0
    flush_interval: float = 0.25
    flush_max: int = 50_000
    prune_interval: float = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """The whole, validated config."""

    source: Path
    agent: AgentSection
    twin: TwinSection
    devices: tuple[DeviceConfig, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def twin_path(self) -> Path:
        return self.agent.data_dir / self.twin.file

    def points(self) -> Iterable[tuple[DeviceConfig, PointConfig]]:
        for device in self.devices:
            for point in device.points:
                yield device, point


# --------------------------------------------------------------------------- validation


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value).lower() if isinstance(value, bool) else repr(value)


class _Table:
    """Reads one TOML table, recording problems with the key path instead of raising."""

    def __init__(self, raw: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.raw = raw
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"{self.key(key)}: {text}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any, kinds: tuple[type, ...], expected: str) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if default is _REQUIRED:
                self.problem(key, f"required, expected {expected}")
                return None
            return default
        value = self.raw[key]
        if isinstance(value, bool) and bool not in kinds:
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        if not isinstance(value, kinds):
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        return value

    def string(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default, (str,), "a string")
        if isinstance(value, str) and key in self.raw and not value.strip():
            self.problem(key, "expected a non-empty string")
            return None
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any) -> Any:
        value = self.get(key, default, (str,), f"one of {', '.join(choices)}")
        if value is not None and value not in choices:
            self.problem(key, f'expected one of {", ".join(choices)}, got "{value}"')
            return None
        return value

    def number(self, key: str, default: Any = None, *, low: float | None = None,
               high: float | None = None, positive: bool = False) -> Any:
        value = self.get(key, default, (int, float), "a number")
        if value is None:
            return None
        value = float(value)
        if not math.isfinite(value):
            self.problem(key, f"expected a finite number, got {value}")
            return None
        if positive and value <= 0:
            self.problem(key, f"expected a number above 0, got {value:g}")
            return None
        return self._bounded(key, value, low, high)

    def integer(self, key: str, default: Any = None, *, low: int | None = None,
                high: int | None = None) -> Any:
        value = self.get(key, default, (int,), "an integer")
        return None if value is None else self._bounded(key, value, low, high)

    def _bounded(self, key: str, value: Any, low: float | None, high: float | None) -> Any:
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"from {low:g} to {high:g}" if low is not None and high is not None else (
                f"at least {low:g}" if low is not None else f"at most {high:g}")
            self.problem(key, f"expected a number {span}, got {value:g}")
            return None
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default, (bool,), "true or false")
        return default if value is None else bool(value)

    def duration(self, key: str, default: str | None, *, positive: bool = True) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if default is None:
                return None
            return parse_duration(default)
        value = self.raw[key]
        expected = 'a duration like "250ms", "10s", "5m", "2h" or "7d"'
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        try:
            seconds = parse_duration(value) if isinstance(value, str) else float(value)
        except ValueError:
            self.problem(key, f"expected {expected}, got {_show(value)}")
            return None
        if positive and seconds <= 0:
            self.problem(key, f"expected a duration above 0, got {_show(value)}")
            return None
        return seconds

    def table(self, key: str) -> _Table:
        value = self.get(key, {}, (dict,), "a table")
        return _Table(value or {}, self.key(key), self.problems)

    def tables(self, key: str) -> list[_Table]:
        value = self.get(key, [], (list,), "an array of tables")
        out = []
        for index, item in enumerate(value or []):
            path = f"{self.key(key)}[{index}]"
            if not isinstance(item, dict):
                self.problems.append(f"{path}: expected a table, got {_show(item)}")
                continue
            out.append(_Table(item, path, self.problems))
        return out

    def finish(self, *, allow: Iterable[str] = ()) -> None:
        """Report every key that was not read as unknown."""
        allowed = set(allow)
        for key in self.raw:
            if key not in self.seen and key not in allowed:
                self.problem(key, "unknown key")


_REQUIRED: Any = object()

# Sections that later parts of the agent own; listed here so they are not called unknown
# until their parser lands. Kept empty on purpose: an unknown section is an error.
_SECTION_PARSERS: dict[str, Any] = {}


def _common_point(t: _Table) -> dict[str, Any]:
    point: dict[str, Any] = {
        "name": t.string("name", _REQUIRED),
        "unit": t.string("unit", ""),
        "writable": t.boolean("writable", False),
        "min": t.number("min"),
        "max": t.number("max"),
        "max_step": t.number("max_step", positive=True),
        "min_interval": t.duration("min_interval", "0s", positive=False),
        "deadband": t.number("deadband", 0.0, low=0.0),
    }
    if point["writable"]:
        for bound in ("min", "max"):
            if point[bound] is None and not t.has(bound):
                t.problem(bound, "required when writable = true, expected a number")
    if point["min"] is not None and point["max"] is not None and point["min"] >= point["max"]:
        t.problem("max", f"expected a number above min ({point['min']:g}), got {point['max']:g}")
    return point


def _opcua_point(t: _Table) -> OpcUaPoint | None:
    point = _common_point(t)
    node = t.string("node", _REQUIRED)
    if node is not None and not _NODE_ID.match(node):
        t.problem("node", f'expected a node id like "ns=1;s=Name", "nsu=urn:x;i=42" or "i=2258", got "{node}"')
        node = None
    t.finish()
    if node is None or None in (point["name"],):
        return None
    return OpcUaPoint(node=node, **point)


def _modbus_point(t: _Table) -> ModbusPoint | None:
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
        "scale": t.number("scale", 1.0),
        "offset": t.number("offset", 0.0),
    }
    if extra["scale"] == 0.0:
        t.problem("scale", "expected a non-zero number, got 0")
        extra["scale"] = None
    t.finish()
    if None in (point["name"], register, address, kind, *extra.values()):
        return None
    return ModbusPoint(register=register, address=address, type=kind, **extra, **point)


def _common_device(t: _Table, protocol: str) -> dict[str, Any]:
    device = {
        "name": t.string("name", _REQUIRED),
        "protocol": protocol,
        "interval": t.duration("interval", "1s"),
        "timeout": t.duration("timeout", "3s"),
        "retry_min": t.duration("retry_min", "1s"),
        "retry_max": t.duration("retry_max", "60s"),
    }
    if device["retry_min"] and device["retry_max"] and device["retry_min"] > device["retry_max"]:
        t.problem("retry_max", "expected a duration at least retry_min")
    return device


def _opcua_device(t: _Table, device: dict[str, Any]) -> OpcUaDevice | None:
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
    points = [_opcua_point(p) for p in t.tables("points")]
    t.finish()
    if None in (endpoint, extra["mode"], extra["security"], *device.values()) or None in points:
        return None
    return OpcUaDevice(endpoint=endpoint, points=tuple(points), **extra, **device)  # type: ignore[arg-type]


def _modbus_device(t: _Table, device: dict[str, Any]) -> ModbusDevice | None:
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
    else:
        extra |= {"host": t.string("host", _REQUIRED), "port": t.integer("port", 502, low=1, high=65535)}
    points = [_modbus_point(p) for p in t.tables("points")]
    t.finish()
    if None in extra.values() or None in device.values() or None in points:
        return None
    built = ModbusDevice(points=tuple(points), **extra, **device)  # type: ignore[arg-type]
    _check_overlaps(built, t)
    return built


def _check_overlaps(device: ModbusDevice, t: _Table) -> None:
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


def _devices(root: _Table) -> list[DeviceConfig]:
    devices: list[DeviceConfig] = []
    for t in root.tables("devices"):
        protocol = t.choice("protocol", PROTOCOLS, _REQUIRED)
        common = _common_device(t, protocol)
        if protocol == "opcua":
            built: DeviceConfig | None = _opcua_device(t, common)
        elif protocol in ("modbus", "modbus-rtu"):
            built = _modbus_device(t, common)
        else:
            t.tables("points")
            t.finish(allow=t.raw.keys())
            built = None
        if built is not None:
            devices.append(built)
    return devices


def _check_names(root: _Table, devices: list[DeviceConfig]) -> None:
    seen_devices: dict[str, int] = {}
    seen_points: dict[str, str] = {}
    for d_index, device in enumerate(root.raw.get("devices", [])):
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


def parse(raw: Mapping[str, Any], source: Path) -> AgentConfig:
    """Validate an already-parsed TOML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = _Table(raw, "", problems)
    a = root.table("agent")
    agent_id = a.string("id", socket.gethostname())
    site = a.string("site", "default")
    data_dir_text = a.string("data_dir", "data")
    log_level = a.choice("log_level", LOG_LEVELS, "info")
    log_format = a.choice("log_format", LOG_FORMATS, "text")
    a.finish()
    tw = root.table("twin")
    twin = {
        "file": tw.string("file", "twin.db"),
        "history_retention": tw.duration("history_retention", "7d"),
        "flush_interval": tw.duration("flush_interval", "250ms"),
        "flush_max": tw.integer("flush_max", 50_000, low=1),
        "prune_interval": tw.duration("prune_interval", "5m"),
    }
    tw.finish()
    devices = _devices(root)
    _check_names(root, devices)
    root.finish(allow=_SECTION_PARSERS)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    data_dir = Path(data_dir_text).expanduser()
    if not data_dir.is_absolute():
        data_dir = (source.parent / data_dir).resolve()
    return AgentConfig(
        source=source,
        agent=AgentSection(id=agent_id, site=site, data_dir=data_dir, log_level=log_level,
                           log_format=log_format),
        twin=TwinSection(**twin),
        devices=tuple(devices),
        raw=raw,
    )


def load(path: str | Path) -> AgentConfig:
    """Read and validate a config file."""
    source = Path(path)
    try:
        text = source.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from exc
    return loads(text, source)


def loads(text: str, source: Path) -> AgentConfig:
    """Validate config text as if it were read from ``source`` (used by reload and set_config)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from exc
    return parse(raw, source)
