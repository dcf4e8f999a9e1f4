"""Property-based: no config text can do more than fail validation with ConfigError.

Hostile values (nan, inf, huge integers, deep nesting, wrong types) are planted in the shipped
sample config at random places, and random text is thrown at the parser. Properties: ``loads``
returns a config or raises ConfigError with one line per problem, nothing else; every number
the agent will use as a duration, size or count in an accepted config is finite and bounded.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import config
from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError
from tests import builders

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = tomllib.loads((ROOT / "config" / "agent.example.toml").read_text())
SOURCE = Path("/nonexistent/agent.toml")
LONGEST = 36500 * 86400.0  # twin.history_retention's ceiling, the longest duration accepted anywhere

hostile_leaf = (st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 10**400, -(10**400), 2**63, -1, 0,
                                 "nan", "inf", "1e999s", "9" * 400 + "d", "-5s", "0s", "", "\x00", True, [], {}])
                | st.floats() | st.integers() | st.text(max_size=20))


def nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of the sample config that holds a plain value or a table."""
    out = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            out += _paths(value, (*prefix, index))
    return out


PATHS = _paths(SAMPLE)


def plant(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of ``doc`` with ``value`` at ``path``."""
    if not path:
        return value
    if isinstance(doc, dict):
        return {k: plant(v, path[1:], value) if k == path[0] else v for k, v in doc.items()}
    return [plant(v, path[1:], value) if i == path[0] else v for i, v in enumerate(doc)]


def numbers(value: Any) -> list[tuple[str, float]]:
    """Every int or float field anywhere in a config's dataclasses (name, value)."""
    out: list[tuple[str, float]] = []
    if is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            if f.name == "raw":
                continue
            item = getattr(value, f.name)
            if isinstance(item, int | float) and not isinstance(item, bool):
                out.append((f.name, float(item)))
            else:
                out += numbers(item)
    elif isinstance(value, tuple | list):
        for item in value:
            out += numbers(item)
    return out


def accepted_or_refused(text: str) -> AgentConfig | None:
    try:
        return config.loads(text, SOURCE)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and "\n" not in p for p in exc.problems), exc.problems
        assert all(p.startswith(f"{SOURCE}: ") for p in exc.problems), exc.problems
        return None


def check_bounded(cfg: AgentConfig) -> None:
    for name, number in numbers(cfg):
        assert math.isfinite(number), (name, number)
        if name in ("interval", "timeout", "retry_min", "retry_max", "min_interval", "keepalive", "clock_skew",
                    "max_validity", "config_deadline", "readback_timeout", "watch", "max_input_age",
                    "publish_interval", "twin_interval", "flush_interval", "points_interval", "prune_interval",
                    "history_retention", "horizon"):
            assert 0 <= number <= LONGEST, (name, number)


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(path=st.sampled_from(PATHS), value=hostile_leaf | st.integers(0, 200).map(nested))
def test_a_hostile_value_anywhere_in_the_sample_is_refused_or_bounded(path: tuple[Any, ...], value: Any) -> None:
    text = builders.toml(plant(SAMPLE, path, value))
    cfg = accepted_or_refused(text)
    if cfg is not None:
        check_bounded(cfg)


@FUZZ
@given(text=st.text(max_size=400) | st.sampled_from(["a = " + "[" * 3000 + "]" * 3000,
                                                     "a = " + "{b = " * 3000 + "1" + "}" * 3000,
                                                     ".".join(["a"] * 3000) + " = 1",
                                                     "[" + ".".join(["t"] * 3000) + "]\nx = 1"]))
def test_any_text_is_refused_with_config_errors_only(text: str) -> None:
    cfg = accepted_or_refused(text)
    if cfg is not None:
        check_bounded(cfg)
