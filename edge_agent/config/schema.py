"""The validated config as frozen dataclasses, and the names and limits the validators use."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
BYTE_ORDERS = ("big", "little")
PARITIES = ("N", "E", "O")
MODBUS_CONNECTIONS = ("own", "shared")  # modbus (TCP): a connection per device, or one per host:port
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

_NODE_ID = re.compile(r"^(?:(?:ns=\d+|nsu=[^;]+);)?(?:i=\d+|s=.+|g=[0-9a-fA-F-]{36}|b=.+)$")


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
    byte_order: str = "big"  # order of the two bytes inside each register (the Modbus spec says big)
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
    server_certificate: Path | None = None  # pinned server certificate (PEM or DER); None: trust on first use
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
    connection: str = "own"  # TCP: "shared" with the other "shared" devices on host:port; RTU always shares the port
    requests_in_flight: int = 1  # TCP: a read's requests sent together (without waiting for each answer)
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
    points_interval: float = 1.0
    prune_interval: float = 300.0
    events_retention: float = 90 * 86400.0  # events (anomalies, outages, command audit) older than this are pruned
    writes_retention: float = 365 * 86400.0  # write attempts through the safety gate, likewise


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
    override_hold: float = 1800.0  # after an operator changed a writable point at the device: no automatic writes


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
    """An ONNX model run on the twin's live data (see edge_agent/control/inference.py)."""

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
TELEMETRY_VERSIONS = (1, 2)  # 1: an object per sample; 2: a run of samples per device read (compact)


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSection:
    """The cloud link: a TLS MQTT broker, and the outbox that buffers for it."""

    host: str
    port: int = 8883  # 1883 when tls = false
    ca_file: Path | None  # required with TLS
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
    tls: bool = True  # false: plain MQTT on a trusted network (logged loudly at start)
    telemetry_version: int = 1  # payload format of the telemetry topic (edge_agent/cloud/payloads.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class SparkplugSection:
    """A Sparkplug B 3.0 edge node on the [mqtt] broker, beside the JSON topics (see edge_agent/cloud/edge_node.py)."""

    enabled: bool = False
    group_id: str = ""  # default: agent.site
    edge_node_id: str = ""  # default: agent.id
    client_id: str = ""  # default: mqtt.client_id + "-sparkplug" (its own connection, its own Will: NDEATH)
    primary_host: str = ""  # a Primary Host Application id: births wait for its STATE online
    accept_writes: bool = False  # DCMD writes, through the safety gate with source "sparkplug"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSection:
    """The read-only local web page (see edge_agent/service/web.py)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080


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
    sparkplug: SparkplugSection = field(default_factory=SparkplugSection)
    web: WebSection = field(default_factory=WebSection)
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
