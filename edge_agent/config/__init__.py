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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.config import devices as _devices_mod
from edge_agent.config import sections as _sections
from edge_agent.config.schema import *  # noqa: F403 - the dataclasses and names are this package's API
from edge_agent.config.schema import (
    LOG_FORMATS,
    LOG_LEVELS,
    AgentConfig,
    AgentSection,
    CommandsSection,
    GateSection,
    MetricsSection,
    SparkplugSection,
    TwinSection,
    WebSection,
)
from edge_agent.config.table import Table, one_line
from edge_agent.errors import ConfigError

MAX_FILE_BYTES = 16 * 1024 * 1024  # a config is a few KiB; anything this big is not one
MAX_DEPTH = 32  # arrays and tables inside each other; the schema needs 6
# A dotted key of more than MAX_DEPTH parts ("a.b.c..."), anywhere: tomllib builds each key with
# tuple concatenation, quadratic in its parts (50,000 parts take half a minute), so such text
# is refused before it is parsed. A string value of 33 dot-separated words would be refused too.
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"\n]*"|'[^'\n]*')"""
_DEEP_KEY = re.compile(rf"{_PART}(?:[ \t]*\.[ \t]*{_PART}){{{MAX_DEPTH}}}")


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
        "history_retention": tw.duration("history_retention", "7d", high="36500d"),
        "flush_interval": tw.duration("flush_interval", "250ms", high="1h"),
        "flush_max": tw.integer("flush_max", 50_000, low=1, high=10_000_000),
        "points_interval": tw.duration("points_interval", "1s", positive=False, high="1h"),
        "prune_interval": tw.duration("prune_interval", "5m", high="1d"),
        "events_retention": tw.duration("events_retention", "90d", high="36500d"),
        "writes_retention": tw.duration("writes_retention", "365d", high="36500d"),
    }
    tw.finish()
    devices = _devices_mod.devices(root, source.parent)
    _devices_mod.check_names(root, devices)
    mqtt = _sections.mqtt(root, agent_id, source.parent)
    models = _sections.models(root, source.parent, {p.name: d.name for d in devices for p in d.points})
    commands = _sections.commands(root, source.parent)
    gate = _sections.gate(root)
    optimizer = _sections.optimizer(root, models, devices)
    sparkplug = _sections.sparkplug(root, agent_id, site, devices, mqtt)
    web = _sections.web(root)
    mt = root.table("metrics")
    metrics = {"enabled": mt.boolean("enabled", False), "host": mt.string("host", "127.0.0.1"),
               "port": mt.integer("port", 9108, low=1, high=65535)}
    mt.finish()
    for label, text in (("site", site), ("id", agent_id)):
        if text is not None and any(c in text for c in "/+#"):
            a.problem(label, f'expected no "/", "+" or "#" (it is an MQTT topic level), got "{text}"')
    root.finish()
    if problems:
        raise ConfigError([one_line(f"{source}: {p}") for p in problems])
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
        sparkplug=sparkplug or SparkplugSection(),
        web=web or WebSection(),
        raw=raw,
    )


def load(path: str | Path) -> AgentConfig:
    """Read and validate a config file."""
    source = Path(path)
    try:
        with source.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # never more: /dev/zero or a runaway file must not eat memory
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from exc
    return loads(text, source)


def loads(text: str, source: Path) -> AgentConfig:
    """Validate config text as if it were read from ``source`` (used by reload and set_config)."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError([f"{source}: expected a config file of at most {MAX_FILE_BYTES // 1024 // 1024} MiB, "
                           f"got more"])
    too_deep = ConfigError([f"{source}: not valid: arrays and tables nested more than {MAX_DEPTH} levels deep"])
    deep_key = _DEEP_KEY.search(text)
    if deep_key is not None:
        line = text.count("\n", 0, deep_key.start()) + 1
        raise ConfigError([f"{source}: line {line}: not valid: a dotted key of more than {MAX_DEPTH} parts "
                           f"(tables nested more than {MAX_DEPTH} levels deep)"])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([one_line(f"{source}: not valid TOML: {exc}")]) from exc
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise too_deep from None
    if _depth(raw) > MAX_DEPTH:  # dotted keys nest without recursing in tomllib; our checks would
        raise too_deep
    return parse(raw, source)


def _depth(doc: Any) -> int:
    """How deeply arrays and tables nest in ``doc`` (iterative: no recursion limit to hit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest
