"""Validation of the optional sections: ``[mqtt]``, ``[[models]]``, ``[commands]``, ``[gate]``,
``[optimizer]``, ``[sparkplug]``, ``[web]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.config.schema import (
    MODEL_KINDS,
    MQTT_VERSIONS,
    OPTIMIZER_MODES,
    ROLES,
    TELEMETRY_VERSIONS,
    Bound,
    CommandsSection,
    DeviceConfig,
    GateSection,
    ModelConfig,
    MqttSection,
    Operator,
    OptimizerSection,
    SparkplugSection,
    WebSection,
)
from edge_agent.config.table import REQUIRED as _REQUIRED
from edge_agent.config.table import Table, finite_number


def resolve(base: Path, text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def mqtt(root: Table, agent_id: str | None, base: Path) -> MqttSection | None:
    if not root.has("mqtt"):
        root.seen.add("mqtt")
        return None
    t = root.table("mqtt")
    # tls = false (plain MQTT, a site's own choice on a trusted network): no CA needed, port 1883
    tls = t.boolean("tls", True)
    values: dict[str, Any] = {
        "host": t.string("host", _REQUIRED),
        "port": t.integer("port", 8883 if tls else 1883, low=1, high=65535),
        "ca_file": resolve(base, t.string("ca_file", _REQUIRED if tls else None)),
        "cert_file": resolve(base, t.string("cert_file")),
        "key_file": resolve(base, t.string("key_file")),
        "username": t.string("username"),
        "password": t.string("password"),
        "client_id": t.string("client_id", agent_id or "edge-agent"),
        "topic_prefix": t.string("topic_prefix", "edge"),
        "version": t.choice("version", MQTT_VERSIONS, "5"),
        "keepalive": t.duration("keepalive", "30s", high="18h"),
        "tls_insecure": t.boolean("tls_insecure", False),
        "publish_interval": t.duration("publish_interval", "1s", high="1h"),
        "max_samples": t.integer("max_samples", 1000, low=1, high=100_000),
        "max_inflight": t.integer("max_inflight", 20, low=1, high=65535),
        "twin_interval": t.duration("twin_interval", "10s", high="1d"),
        "outbox_max_rows": t.integer("outbox_max_rows", 100_000, low=10, high=100_000_000),
        "outbox_max_bytes": t.size("outbox_max_bytes", "256MiB"),
        "outbox_sync": t.choice("outbox_sync", ("normal", "full"), "normal"),
        "replay_rate": t.number("replay_rate", 100_000.0, positive=True, high=1e9),
        "retry_min": t.duration("retry_min", "1s", high="1d"),
        "retry_max": t.duration("retry_max", "60s", high="1d"),
        "telemetry_version": _telemetry_version(t),
    }
    if (values["cert_file"] is None) != (values["key_file"] is None):
        t.problem("key_file" if values["key_file"] is None else "cert_file",
                  "cert_file and key_file go together (mutual TLS), expected both or neither")
    if values["password"] is not None and values["username"] is None:
        t.problem("password", "given without username")
    if not tls:
        for key in ("ca_file", "cert_file", "key_file", "tls_insecure"):
            if t.has(key) and values[key]:
                t.problem(key, "only applies with TLS, but tls = false (plain MQTT); remove it or set tls = true")
    values["tls"] = tls
    prefix = values["topic_prefix"]
    if prefix is not None and (any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/")):
        t.problem("topic_prefix", f'expected topic levels without wildcards or a leading/trailing "/", got "{prefix}"')
        values["topic_prefix"] = None
    t.finish()
    required = ("host", "port", "tls", "client_id", "topic_prefix", "version", "keepalive", "publish_interval",
                "max_samples", "max_inflight", "twin_interval", "outbox_max_rows", "outbox_max_bytes",
                "outbox_sync", "replay_rate", "retry_min", "retry_max", "telemetry_version")
    if any(values[key] is None for key in required) or (tls and values["ca_file"] is None):
        return None
    return MqttSection(**values)


def _telemetry_version(t: Table) -> int | None:
    """``mqtt.telemetry_version``: the payload format of the telemetry topic, 1 or 2 (a TOML integer)."""
    expected = " or ".join(str(v) for v in TELEMETRY_VERSIONS)
    value = t.get("telemetry_version", 1, (int,), expected)
    if value is not None and value not in TELEMETRY_VERSIONS:
        t.problem("telemetry_version", f"expected {expected}, got {value}")
        return None
    return value


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
        if (not isinstance(span, list) or len(span) != 2 or not all(finite_number(v) for v in span)
                or span[0] >= span[1]):
            t.problem(f"plausible.{point}", f"expected [min, max] with min < max, got {span!r}")
            return None
        out[point] = (float(span[0]), float(span[1]))
    return out


def models(root: Table, base: Path, points: dict[str, str]) -> list[ModelConfig]:
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for t in root.tables("models"):
        name = t.string("name", _REQUIRED)
        values: dict[str, Any] = {
            "kind": t.choice("kind", MODEL_KINDS, _REQUIRED),
            "file": resolve(base, t.string("file", _REQUIRED)),
            "inputs": _names(t, "inputs"),
            "outputs": _names(t, "outputs"),
            "interval": t.duration("interval", "5s", high="1d"),
            "threshold": t.number("threshold"),
            "window": t.integer("window", 0, low=0, high=10_000),
            "raise_after": t.integer("raise_after", 3, low=1, high=1000),
            "clear_after": t.integer("clear_after", 3, low=1, high=1000),
            "max_input_age": t.duration("max_input_age", "30s", high="1d"),
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


def commands(root: Table, base: Path) -> CommandsSection | None:
    t = root.table("commands")
    operators: list[Operator] = []
    names: set[str] = set()
    for o in t.tables("operators"):
        name, role = o.string("name", _REQUIRED), o.choice("role", ROLES, _REQUIRED)
        key = resolve(base, o.string("public_key", _REQUIRED))
        o.finish()
        if name in names:
            o.problem("name", f'duplicate operator "{name}"')
        names.add(name)
        if None not in (name, role, key):
            operators.append(Operator(name=name, role=role, public_key=key))  # type: ignore[arg-type]
    values = {
        "enabled": t.boolean("enabled", False),
        "max_payload": t.size("max_payload", "4MiB", high="256MiB"),
        "clock_skew": t.duration("clock_skew", "60s", high="1h"),
        "max_validity": t.duration("max_validity", "1h", high="30d"),
        "config_deadline": t.duration("config_deadline", "60s", high="1h"),
    }
    t.finish()
    if values["enabled"] and not t.raw.get("operators"):
        t.problem("operators", "commands are enabled but no operator is configured")
    if None in values.values():
        return None
    return CommandsSection(operators=tuple(operators), **values)


def gate(root: Table) -> GateSection | None:
    t = root.table("gate")
    values = {
        "block_on_anomaly": t.boolean("block_on_anomaly", True),
        "ramp": t.boolean("ramp", False),
        "readback_timeout": t.duration("readback_timeout", "10s", high="1h"),
        "watch": t.duration("watch", "5m", high="1d"),
        "max_input_age": t.duration("max_input_age", "30s", high="1d"),
        "override_hold": t.duration("override_hold", "30m", high="30d"),
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


def optimizer(root: Table, models: list[ModelConfig], devices: list[DeviceConfig]) -> OptimizerSection | None:
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
    if objective is not None and (not objective or not all(finite_number(v) for v in objective.values())):
        t.problem("objective", 'expected a table of output = weight, e.g. { "chiller1.power" = 1.0 }')
        objective = None
    values = {
        "mode": t.choice("mode", OPTIMIZER_MODES, "advise"),
        "interval": t.duration("interval", "60s", high="1d"),
        "candidates": t.integer("candidates", 21, low=2, high=1001),
        "min_gain": t.number("min_gain", 0.0, low=0.0),
        "horizon": t.duration("horizon", None, high="1d"),
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


def _topic_level(text: str) -> bool:
    """Whether ``text`` can be one MQTT topic level (Sparkplug ids are topic levels)."""
    return bool(text) and not any(c in text for c in "/+#") and "\x00" not in text


def sparkplug(root: Table, agent_id: str | None, site: str | None, devices: list[DeviceConfig],
              mqtt: MqttSection | None) -> SparkplugSection | None:
    """``[sparkplug]``: a Sparkplug B edge node on the ``[mqtt]`` broker."""
    t = root.table("sparkplug")
    values: dict[str, Any] = {
        "enabled": t.boolean("enabled", False),
        "group_id": t.string("group_id", site or ""),
        "edge_node_id": t.string("edge_node_id", agent_id or ""),
        "client_id": t.string("client_id", f"{mqtt.client_id}-sparkplug" if mqtt is not None else ""),
        "primary_host": t.string("primary_host", ""),
        "accept_writes": t.boolean("accept_writes", False),
    }
    t.finish()
    for key in ("group_id", "edge_node_id", "primary_host"):
        text = values[key]
        if text and not _topic_level(text):
            t.problem(key, f'expected a Sparkplug id without "/", "+" or "#" (it is an MQTT topic level), got "{text}"')
            values[key] = None
    if values["enabled"]:
        if not root.has("mqtt"):
            t.problem("enabled", "Sparkplug needs the broker settings of an [mqtt] section")
        for i, device in enumerate(devices):
            if not _topic_level(device.name):
                t.problem("enabled", f'devices[{i}].name "{device.name}" cannot be a Sparkplug device id '
                                     '(no "/", "+" or "#": it is an MQTT topic level)')
    if None in values.values():
        return None
    return SparkplugSection(**values)


def web(root: Table) -> WebSection | None:
    """``[web]``: the read-only local web page."""
    t = root.table("web")
    values = {"enabled": t.boolean("enabled", False), "host": t.string("host", "127.0.0.1"),
              "port": t.integer("port", 8080, low=1, high=65535)}
    t.finish()
    return None if None in values.values() else WebSection(**values)
