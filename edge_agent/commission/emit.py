"""A ``[[devices]]`` block from what :func:`edge_agent.commission.browse.browse` found.

Every Variable becomes one ``[[devices.points]]`` named ``DEVICE.<browse name in snake_case>``,
made unique with ``_2``, ``_3``, ... in listing order. Variables that should not simply be read as
they are come out commented out, each with the reason on the line above:

- writable ones: a point that may be written needs ``min`` and ``max`` (its safe range), and
  nobody but the operator can tell what they are; uncommented as is, check-config says so;
- arrays and variables the session may not read.

The block loads with ``check-config`` once an ``[agent]`` table is added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from edge_agent.commission.browse import Variable


def snake_case(name: str) -> str:
    """``SupplyTemp`` -> ``supply_temp``, ``HTTPPort`` -> ``http_port``, ``PT-101.PV`` -> ``pt_101_pv``."""
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", text)
    text = re.sub(r"[\W_]+", "_", text).strip("_").lower()  # letters of any script stay
    return text or "point"


def point_names(device: str, browse_names: Iterable[str]) -> list[str]:
    """``device.<snake_case>`` for each browse name, unique: a repeat gets ``_2``, ``_3``, ..."""
    taken: set[str] = set()
    names = []
    for browse_name in browse_names:
        base = f"{device}.{snake_case(browse_name)}"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names.append(name)
    return names


def device_block(device: str, endpoint: str, variables: Sequence[Variable], *, security: str = "None",
                 username: str | None = None) -> str:
    """The TOML text of one OPC UA ``[[devices]]`` block with a point per variable."""
    writable = sum(1 for v in variables if v.writable)
    lines = [
        f"# edge-agent browse {_comment(endpoint)} (read-only): {len(variables)} variables, "
        f"{writable} writable (commented out)",
        "# Add an [agent] table, then check the file with: edge-agent check-config --config FILE",
        "",
        "[[devices]]",
        f"name = {_string(device)}",
        'protocol = "opcua"',
        f"endpoint = {_string(endpoint)}",
        f"security = {_string(security)}",
    ]
    if username is not None:
        lines += [f"username = {_string(username)}",
                  '# password = "..."  # the password is not copied here: add it, and keep the file private']
    for variable, name in zip(variables, point_names(device, (v.browse_name for v in variables)), strict=True):
        lines += ["", *_point(variable, name)]
    return "\n".join(lines) + "\n"


def _point(variable: Variable, name: str) -> list[str]:
    shown = "-" if variable.value is None else _comment(json.dumps(variable.value, ensure_ascii=False))
    lines = [
        "  [[devices.points]]",
        f"  name = {_string(name)}",
        f"  node = {_string(variable.node)}",
    ]
    if variable.writable:
        lines.append("  writable = true")
    note = f"  # {_comment(variable.path)}: {variable.type}, {_comment(shown[:60])} ({variable.status})"
    reason = _why_commented(variable)
    if reason is None:
        return [note, *lines]
    return [note, *(f"  # {line}" for line in reason.splitlines()), *(f"  # {line.strip()}" for line in lines)]


def _why_commented(variable: Variable) -> str | None:
    if variable.writable:
        return ("writable: it needs min and max (the range the agent may write) before it may be written;\n"
                "or drop writable = true to only read it")
    if not variable.readable:
        return "not readable with this login"
    if variable.array:
        return "an array: the twin keeps one scalar per point"
    return None


def _string(text: str) -> str:
    # JSON's string escapes are all valid in a TOML basic string; DEL must be escaped in TOML too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _comment(text: str) -> str:
    """Text safe inside a TOML comment: one line, no control characters."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text)
