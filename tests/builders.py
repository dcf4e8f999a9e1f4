"""One way to build a test's config: plain dicts and lists (a TOML document), written as TOML.

A test describes its config with the helpers below and gets the loaded AgentConfig back
(:func:`load`, which also writes the file the CLI and ``get_config`` read) or the TOML text
(:func:`toml`)::

    doc = config(tmp_path / "data", devices=[modbus("pump1", [point("pump1.flow", address=0)])],
                 mqtt=mqtt(pki, broker.port), twin={"flush_interval": "50ms"})
    cfg = load(doc, tmp_path / "agent.toml")

A value of ``None`` leaves its key out. Only tests whose subject is the TOML text itself write it
by hand: the golden folders in tests/testcases/config, the shipped samples (config/, the demo).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import config as config_mod
from edge_agent.config import AgentConfig
from edge_agent.demo.plant import NAMESPACE_URI, Plant

if TYPE_CHECKING:
    from tests.mqtt_broker import Pki

Doc = dict[str, Any]

# ------------------------------------------------------------------------------------ the writer

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml(doc: Mapping[str, Any]) -> str:
    """``doc`` as TOML text: tables, arrays of tables, strings, numbers, booleans, paths and lists.

    Within a table its plain keys come first, then its sub-tables, then its arrays of tables;
    every table gets its header, so an empty one (``gate={}``) is still there.
    """
    lines: list[str] = []
    _table(lines, (), doc)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    indent = "  " * max(len(path) - 1, 0)  # [[devices.points]] and its keys indented, as in the samples
    items = [(k, v) for k, v in table.items() if v is not None]
    for key, value in items:
        if not _is_table(value) and not _is_table_array(value):
            lines.append(f"{indent}{_key(key)} = {_value(value)}")
    for key, value in items:
        if _is_table(value):
            lines += ["", f"{'  ' * len(path)}[{_dotted((*path, key))}]"]
            _table(lines, (*path, key), value)
    for key, value in items:
        if _is_table_array(value):
            for entry in value:
                lines += ["", f"{'  ' * len(path)}[[{_dotted((*path, key))}]]"]
                _table(lines, (*path, key), entry)


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(_key(part) for part in path)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    # JSON's string escapes are TOML's basic-string escapes; DEL must be escaped in TOML too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Path):
        return _string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # a table inside an array: inline
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML for {type(value).__name__} {value!r}")


def write(doc: Mapping[str, Any], path: Path) -> Path:
    """Write ``doc`` as TOML to ``path``; returns ``path``."""
    path.write_text(toml(doc))
    return path


def load(doc: Mapping[str, Any], path: Path) -> AgentConfig:
    """Write ``doc`` to ``path`` and load it the way the agent does (edge_agent.config.load)."""
    return config_mod.load(write(doc, path))


# ------------------------------------------------------------------------------------ the shapes


def config(data_dir: Path | None, *, id: str | None = "gw", site: str | None = None,
           devices: Sequence[Doc] = (), models: Sequence[Doc] = (), **sections: Doc | None) -> Doc:
    """A whole config: [agent], the given sections (twin, mqtt, commands, gate, metrics, optimizer, ...),
    [[devices]] and [[models]]. ``data_dir=None`` and ``id=None`` leave those keys out."""
    doc: Doc = {"agent": {"id": id, "site": site, "data_dir": data_dir}}
    doc.update({name: section for name, section in sections.items() if section is not None})
    if devices:
        doc["devices"] = list(devices)
    if models:
        doc["models"] = list(models)
    return doc


def point(name: str, **options: Any) -> Doc:
    """One [[devices.points]] entry."""
    return {"name": name, **options}


def numbered(prefix: str, count: int, **options: Any) -> list[Doc]:
    """``count`` points named ``prefix0``, ``prefix1``, ... at Modbus addresses 0, 1, ..."""
    return [point(f"{prefix}{i}", address=i, **options) for i in range(count)]


def modbus(name: str, points: Sequence[Doc], *, host: str = "127.0.0.1", **options: Any) -> Doc:
    """A Modbus TCP [[devices]] block. Tests that use the fake driver (tests/fakes.py) configure
    their devices this way too: the config must validate, the fake ignores the addresses."""
    return {"name": name, "protocol": "modbus", "host": host, **options, "points": list(points)}


def opcua(name: str, endpoint: str, points: Sequence[Doc], **options: Any) -> Doc:
    """An OPC UA [[devices]] block."""
    return {"name": name, "protocol": "opcua", "endpoint": endpoint, **options, "points": list(points)}


def model(name: str, kind: str, file: Path | str, **options: Any) -> Doc:
    """One [[models]] entry."""
    return {"name": name, "kind": kind, "file": file, **options}


def mqtt(pki: Pki, port: int, *, host: str = "localhost", ca: Path | None = None, cert: Path | None = None,
         key: Path | None = None, **options: Any) -> Doc:
    """An [mqtt] section for the test broker (tests/mqtt_broker.py) with the agent's client cert."""
    return {"host": host, "port": port, "ca_file": ca or pki.ca_cert, "cert_file": cert or pki.agent_cert,
            "key_file": key or pki.agent_key, **options}


def operator(name: str, role: str, public_key: Path) -> Doc:
    """One [[commands.operators]] entry."""
    return {"name": name, "role": role, "public_key": public_key}


def commands(operators: Sequence[Doc], **options: Any) -> Doc:
    """A [commands] section, enabled, with its operators."""
    return {"enabled": True, **options, "operators": list(operators)}


def optimizer(model: str, setpoints: Sequence[str], objective: Mapping[str, float], *,
              constraints: Sequence[Doc] = (), guards: Sequence[Doc] = (), **options: Any) -> Doc:
    """An [optimizer] section over the simulation model ``model``; constraints name outputs
    (``{"output": ..., "max": ...}``), guards name points."""
    return {**options, "model": model, "setpoints": list(setpoints), "objective": dict(objective),
            "constraints": list(constraints) or None, "guards": list(guards) or None}


# The simulated plant (edge_agent.demo.plant): the chiller over OPC UA, the pump over Modbus TCP.


def chiller(plant: Plant, *, setpoint_interval: str = "0s") -> Doc:
    """The chiller with its supply temperature, load and writable setpoint (subscribed)."""
    def node(name: str) -> str:
        return f"nsu={NAMESPACE_URI};s=Chiller1.{name}"

    return opcua("chiller1", plant.opcua_endpoint, [
        point("chiller1.supply_temp", node=node("SupplyTemp")),
        point("chiller1.load", node=node("Load")),
        point("chiller1.setpoint", node=node("Setpoint"), writable=True, min=5.0, max=12.0, max_step=0.5,
              min_interval=setpoint_interval),
    ], mode="subscribe", interval="0.5s", retry_min="0.2s", retry_max="1s")


def pump(plant: Plant) -> Doc:
    """The pump with its flow and writable speed setpoint (at most one write an hour)."""
    return modbus("pump1", [
        point("pump1.flow", address=0, type="float32"),
        point("pump1.speed_setpoint", address=20, type="uint16", writable=True, min=900.0, max=1700.0,
              max_step=100.0, min_interval="1h"),
    ], port=plant.modbus_port, interval="0.2s", retry_min="0.2s", retry_max="1s")


def plant_config(tmp_path: Path, plant: Plant, *, gate: Doc | None = None, models: Sequence[Doc] = (),
                 optimizer: Doc | None = None, chiller_interval: str = "0s") -> AgentConfig:
    """A config for the simulated plant's real servers (chiller and pump), written to tmp_path/agent.toml.

    ``chiller_interval`` is the setpoint's min_interval; the data stays in tmp_path.
    """
    doc = config(tmp_path, id="gate-test", gate=gate or {}, optimizer=optimizer,
                 devices=[chiller(plant, setpoint_interval=chiller_interval), pump(plant)], models=models)
    return load(doc, tmp_path / "agent.toml")
