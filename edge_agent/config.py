"""Config file: TOML parsed once into frozen dataclasses, every problem named by key path.

``load(path)`` returns an :class:`AgentConfig` or raises :class:`ConfigError` whose
``problems`` hold one line per problem, e.g.::

    agent.toml: devices[1].points[0].type: expected one of int16, uint16, ..., got "flaot32"

The file is never rewritten. Every key has a default and a commented line in
config/agent.example.toml.
"""

from __future__ import annotations

import re
import socket
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from edge_agent.validate import REQUIRED as _REQUIRED
from edge_agent.validate import Table

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

_NODE_ID = re.compile(r"^(?:(?:ns=\d+|nsu=[^;]+);)?(?:i=\d+|s=.+|g=[0-9a-fA-F-]{36}|b=.+)$")


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
class MetricsSection:
    """The optional Prometheus text endpoint (loopback by default)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9108


ROLES = ("viewer", "operator", "admin")
OPTIMIZER_MODES = ("off", "advise", "auto")


@dataclass(frozen=True, slots=True, kw_only=True)
class Operator:
    """A person (or tool) allowed to send signed commands."""

    name: str
    role: str
    public_key: Path  # Ed25519 public key, PEM


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandsSection:
    """Remote management over MQTT: signed commands, roles, replay protection."""

    enabled: bool = False
    operators: tuple[Operator, ...] = ()
    max_payload: int = 4 * 1024 * 1024  # bytes; update_model carries a whole ONNX file
    clock_skew: float = 60.0
    max_validity: float = 3600.0  # expires_at may be at most this far after issued_at
    config_deadline: float = 60.0  # set_config: healthy within this, or roll back


@dataclass(frozen=True, slots=True, kw_only=True)
class GateSection:
    """The safety gate every write passes (per-point limits live on the points)."""

    block_on_anomaly: bool = True
    ramp: bool = False  # a request beyond max_step: refuse (false) or move one max_step towards it (true)
    readback_timeout: float = 10.0
    watch: float = 300.0  # after an automatic write, roll back if the plant reacts badly within this
    max_input_age: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Bound:
    """A limit on a value: a predicted output (constraint) or a measured point (guard)."""

    name: str
    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerSection:
    """Setpoint optimisation with a simulation model."""

    mode: str = "advise"
    model: str
    interval: float = 60.0
    setpoints: tuple[str, ...]
    objective: Mapping[str, float]  # minimise the sum of weight * predicted output
    constraints: tuple[Bound, ...] = ()  # on predicted outputs
    guards: tuple[Bound, ...] = ()  # on measured points, watched after automatic writes
    candidates: int = 21  # grid points per setpoint inside the gate's envelope
    min_gain: float = 0.0  # write only when the predicted objective improves by more than this
    horizon: float | None = None  # when predictions are checked against the plant; default: the model's


MODEL_KINDS = ("anomaly", "simulation")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """An ONNX model run on the twin's live data (see edge_agent/inference.py)."""

    name: str
    kind: str
    file: Path
    inputs: tuple[str, ...] = ()  # empty: taken from the file's metadata
    outputs: tuple[str, ...] = ()  # simulation: output names; empty: from metadata
    interval: float = 5.0
    threshold: float | None = None  # anomaly: None means the file's metadata threshold
    window: int = 0  # 0: [batch, n_inputs]; N: [batch, N, n_inputs] from history
    raise_after: int = 3
    clear_after: int = 3
    max_input_age: float = 30.0
    plausible: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    threads: int = 1
    equipment: str | None = None  # device the model judges; default: the device of its first input

    @property
    def score_point(self) -> str:
        """The derived point that keeps this model's score (with history)."""
        return f"{self.name}.score"


MQTT_VERSIONS = ("5", "3.1.1")


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSection:
    """The cloud link: a TLS MQTT broker, and the outbox that buffers for it."""

    host: str
    port: int = 8883
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    client_id: str
    topic_prefix: str = "edge"
    version: str = "5"
    keepalive: float = 30.0
    tls_insecure: bool = False
    publish_interval: float = 1.0
    max_samples: int = 1000
    max_inflight: int = 20
    twin_interval: float = 10.0
    outbox_max_rows: int = 100_000
    outbox_max_bytes: int = 256 * 1024 * 1024
    outbox_sync: str = "normal"
    replay_rate: float = 100_000.0
    retry_min: float = 1.0
    retry_max: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """The whole, validated config."""

    source: Path
    agent: AgentSection
    twin: TwinSection
    devices: tuple[DeviceConfig, ...] = ()
    mqtt: MqttSection | None = None
    models: tuple[ModelConfig, ...] = ()
    metrics: MetricsSection = field(default_factory=MetricsSection)
    commands: CommandsSection = field(default_factory=CommandsSection)
    gate: GateSection = field(default_factory=GateSection)
    optimizer: OptimizerSection | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def twin_path(self) -> Path:
        return self.agent.data_dir / self.twin.file

    def points(self) -> Iterable[tuple[DeviceConfig, PointConfig]]:
        for device in self.devices:
            for point in device.points:
                yield device, point

    def all_points(self) -> Iterable[tuple[str, str, str]]:
        """(point, owner, unit) of every point in the twin: device points, then models' derived scores."""
        for device, point in self.points():
            yield point.name, device.name, point.unit
        for model in self.models:
            if model.kind == "anomaly":
                yield model.score_point, f"model:{model.name}", ""


# --------------------------------------------------------------------------- validation



# Sections that later parts of the agent own; listed here so they are not called unknown
# until their parser lands. Kept empty on purpose: an unknown section is an error.
_SECTION_PARSERS: dict[str, Any] = {}


def _common_point(t: Table) -> dict[str, Any]:
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


def _common_device(t: Table, protocol: str) -> dict[str, Any]:
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


def _opcua_device(t: Table, device: dict[str, Any]) -> OpcUaDevice | None:
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
    else:
        extra |= {"host": t.string("host", _REQUIRED), "port": t.integer("port", 502, low=1, high=65535)}
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


def _devices(root: Table) -> list[DeviceConfig]:
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


def _check_names(root: Table, devices: list[DeviceConfig]) -> None:
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


def _resolve(base: Path, text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _mqtt(root: Table, agent_id: str | None, base: Path) -> MqttSection | None:
    if not root.has("mqtt"):
        root.seen.add("mqtt")
        return None
    t = root.table("mqtt")
    values: dict[str, Any] = {
        "host": t.string("host", _REQUIRED),
        "port": t.integer("port", 8883, low=1, high=65535),
        "ca_file": _resolve(base, t.string("ca_file", _REQUIRED)),
        "cert_file": _resolve(base, t.string("cert_file")),
        "key_file": _resolve(base, t.string("key_file")),
        "username": t.string("username"),
        "password": t.string("password"),
        "client_id": t.string("client_id", agent_id or "edge-agent"),
        "topic_prefix": t.string("topic_prefix", "edge"),
        "version": t.choice("version", MQTT_VERSIONS, "5"),
        "keepalive": t.duration("keepalive", "30s"),
        "tls_insecure": t.boolean("tls_insecure", False),
        "publish_interval": t.duration("publish_interval", "1s"),
        "max_samples": t.integer("max_samples", 1000, low=1, high=100_000),
        "max_inflight": t.integer("max_inflight", 20, low=1, high=65535),
        "twin_interval": t.duration("twin_interval", "10s"),
        "outbox_max_rows": t.integer("outbox_max_rows", 100_000, low=10),
        "outbox_max_bytes": t.size("outbox_max_bytes", "256MiB"),
        "outbox_sync": t.choice("outbox_sync", ("normal", "full"), "normal"),
        "replay_rate": t.number("replay_rate", 100_000.0, positive=True),
        "retry_min": t.duration("retry_min", "1s"),
        "retry_max": t.duration("retry_max", "60s"),
    }
    if (values["cert_file"] is None) != (values["key_file"] is None):
        t.problem("key_file" if values["key_file"] is None else "cert_file",
                  "cert_file and key_file go together (mutual TLS), expected both or neither")
    if values["password"] is not None and values["username"] is None:
        t.problem("password", "given without username")
    prefix = values["topic_prefix"]
    if prefix is not None and (any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/")):
        t.problem("topic_prefix", f'expected topic levels without wildcards or a leading/trailing "/", got "{prefix}"')
        values["topic_prefix"] = None
    t.finish()
    required = ("host", "port", "ca_file", "client_id", "topic_prefix", "version", "keepalive", "publish_interval",
                "max_samples", "max_inflight", "twin_interval", "outbox_max_rows", "outbox_max_bytes",
                "outbox_sync", "replay_rate", "retry_min", "retry_max")
    if any(values[key] is None for key in required):
        return None
    return MqttSection(**values)


def _names(t: Table, key: str) -> tuple[str, ...] | None:
    value = t.get(key, [], (list,), "an array of point names")
    if value is None:
        return None
    if not all(isinstance(v, str) and v for v in value):
        t.problem(key, "expected an array of point names (strings)")
        return None
    if len(set(value)) != len(value):
        t.problem(key, "expected each name once")
        return None
    return tuple(value)


def _plausible(t: Table) -> dict[str, tuple[float, float]] | None:
    table = t.get("plausible", {}, (dict,), 'a table of point = [min, max]')
    if table is None:
        return None
    out: dict[str, tuple[float, float]] = {}
    for point, span in table.items():
        if (not isinstance(span, list) or len(span) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in span)
                or span[0] >= span[1]):
            t.problem(f"plausible.{point}", f"expected [min, max] with min < max, got {span!r}")
            return None
        out[point] = (float(span[0]), float(span[1]))
    return out


def _models(root: Table, base: Path, points: dict[str, str]) -> list[ModelConfig]:
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for t in root.tables("models"):
        name = t.string("name", _REQUIRED)
        values: dict[str, Any] = {
            "kind": t.choice("kind", MODEL_KINDS, _REQUIRED),
            "file": _resolve(base, t.string("file", _REQUIRED)),
            "inputs": _names(t, "inputs"),
            "outputs": _names(t, "outputs"),
            "interval": t.duration("interval", "5s"),
            "threshold": t.number("threshold"),
            "window": t.integer("window", 0, low=0, high=10_000),
            "raise_after": t.integer("raise_after", 3, low=1, high=1000),
            "clear_after": t.integer("clear_after", 3, low=1, high=1000),
            "max_input_age": t.duration("max_input_age", "30s"),
            "plausible": _plausible(t),
            "threads": t.integer("threads", 1, low=1, high=64),
            "equipment": t.string("equipment"),
        }
        if name is not None:
            if name in seen:
                t.problem("name", f'duplicate model name "{name}"')
            elif f"{name}.score" in points:
                t.problem("name", f'"{name}.score" would clash with a point of device "{points[name + ".score"]}"')
            seen.add(name)
        for key in ("inputs", "plausible"):
            for point in values[key] or ():
                if point not in points:
                    t.problem(key, f'no point named "{point}" is configured')
        if values["equipment"] is not None and values["equipment"] not in set(points.values()):
            t.problem("equipment", f'no device named "{values["equipment"]}" is configured')
        t.finish()
        if name is not None and None not in (values["kind"], values["file"], values["interval"], values["window"],
                                             values["inputs"], values["outputs"], values["plausible"]):
            models.append(ModelConfig(name=name, **values))
    return models


def _commands(root: Table, base: Path) -> CommandsSection | None:
    t = root.table("commands")
    operators: list[Operator] = []
    names: set[str] = set()
    for o in t.tables("operators"):
        name, role = o.string("name", _REQUIRED), o.choice("role", ROLES, _REQUIRED)
        key = _resolve(base, o.string("public_key", _REQUIRED))
        o.finish()
        if name in names:
            o.problem("name", f'duplicate operator "{name}"')
        names.add(name)
        if None not in (name, role, key):
            operators.append(Operator(name=name, role=role, public_key=key))  # type: ignore[arg-type]
    values = {
        "enabled": t.boolean("enabled", False),
        "max_payload": t.size("max_payload", "4MiB"),
        "clock_skew": t.duration("clock_skew", "60s"),
        "max_validity": t.duration("max_validity", "1h"),
        "config_deadline": t.duration("config_deadline", "60s"),
    }
    t.finish()
    if values["enabled"] and not t.raw.get("operators"):
        t.problem("operators", "commands are enabled but no operator is configured")
    if None in values.values():
        return None
    return CommandsSection(operators=tuple(operators), **values)


def _gate(root: Table) -> GateSection | None:
    t = root.table("gate")
    values = {
        "block_on_anomaly": t.boolean("block_on_anomaly", True),
        "ramp": t.boolean("ramp", False),
        "readback_timeout": t.duration("readback_timeout", "10s"),
        "watch": t.duration("watch", "5m"),
        "max_input_age": t.duration("max_input_age", "30s"),
    }
    t.finish()
    return None if None in values.values() else GateSection(**values)


def _bounds(t: Table, key: str, name_key: str, known: set[str], what: str) -> tuple[Bound, ...] | None:
    bounds = []
    for b in t.tables(key):
        name = b.string(name_key, _REQUIRED)
        low, high = b.number("min"), b.number("max")
        b.finish()
        if name is not None and name not in known:
            b.problem(name_key, f'no {what} named "{name}"')
            name = None
        if low is None and high is None:
            b.problem("max", "expected min, max or both")
            name = None
        if name is not None:
            bounds.append(Bound(name=name, min=low, max=high))
    return tuple(bounds)


def _optimizer(root: Table, models: list[ModelConfig], devices: list[DeviceConfig]) -> OptimizerSection | None:
    if not root.has("optimizer"):
        root.seen.add("optimizer")
        return None
    t = root.table("optimizer")
    writable = {p.name for d in devices for p in d.points if p.writable}
    points = {p.name for d in devices for p in d.points}
    model_name = t.string("model", _REQUIRED)
    model = next((m for m in models if m.name == model_name), None)
    if model_name is not None and (model is None or model.kind != "simulation"):
        t.problem("model", f'expected the name of a [[models]] entry with kind = "simulation", got "{model_name}"')
    setpoints = _names(t, "setpoints")
    for name in setpoints or ():
        if name not in writable:
            t.problem("setpoints", f'"{name}" is not a writable point (writable = true with min and max)')
    objective = t.get("objective", _REQUIRED, (dict,), "a table of output = weight")
    if objective is not None and (not objective or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in objective.values())):
        t.problem("objective", 'expected a table of output = weight, e.g. { "chiller1.power" = 1.0 }')
        objective = None
    values = {
        "mode": t.choice("mode", OPTIMIZER_MODES, "advise"),
        "interval": t.duration("interval", "60s"),
        "candidates": t.integer("candidates", 21, low=2, high=1001),
        "min_gain": t.number("min_gain", 0.0, low=0.0),
        "horizon": t.duration("horizon", None),
        # outputs are named by the model file; checked against it when the model loads
        "constraints": _bounds(t, "constraints", "output", _ANY, "output"),
        "guards": _bounds(t, "guards", "point", points, "point"),
    }
    t.finish()
    if None in (model_name, setpoints, objective, *(v for k, v in values.items() if k != "horizon")) or not setpoints:
        if setpoints == ():
            t.problem("setpoints", "expected at least one writable point")
        return None
    return OptimizerSection(model=model_name, setpoints=setpoints,
                            objective={k: float(v) for k, v in objective.items()}, **values)


class _Anything(set[str]):
    """A name set that contains every name (outputs are checked against the model file later)."""

    def __contains__(self, item: object) -> bool:
        return True


_ANY = _Anything()


def parse(raw: Mapping[str, Any], source: Path) -> AgentConfig:
    """Validate an already-parsed TOML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = Table(raw, "", problems)
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
    mqtt = _mqtt(root, agent_id, source.parent)
    models = _models(root, source.parent, {p.name: d.name for d in devices for p in d.points})
    commands = _commands(root, source.parent)
    gate = _gate(root)
    optimizer = _optimizer(root, models, devices)
    mt = root.table("metrics")
    metrics = {"enabled": mt.boolean("enabled", False), "host": mt.string("host", "127.0.0.1"),
               "port": mt.integer("port", 9108, low=1, high=65535)}
    mt.finish()
    for label, text in (("site", site), ("id", agent_id)):
        if text is not None and any(c in text for c in "/+#"):
            a.problem(label, f'expected no "/", "+" or "#" (it is an MQTT topic level), got "{text}"')
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
        mqtt=mqtt,
        models=tuple(models),
        metrics=MetricsSection(**metrics),
        commands=commands or CommandsSection(),
        gate=gate or GateSection(),
        optimizer=optimizer,
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
