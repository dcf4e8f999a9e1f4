"""What the commissioning commands print: JSON-able objects and text tables (the CLI only prints them)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from drivers.base import BAD, Reading
from edge_agent.commission.browse import BrowseResult
from edge_agent.commission.check import DeviceCheck
from edge_agent.commission.decode import LABELS, WIDTHS, Decoding
from edge_agent.commission.probe import Probe

# ------------------------------------------------------------------------------------ browse


def browse_json(result: BrowseResult) -> list[dict[str, Any]]:
    """One object per variable: node, path, browse_name, type, value_type, array, readable,
    writable, value, status."""
    return [{"node": v.node, "path": v.path, "browse_name": v.browse_name, "type": v.type,
             "value_type": v.value_type, "array": v.array, "readable": v.readable, "writable": v.writable,
             "value": v.value, "status": v.status} for v in result.variables]


def browse_text(result: BrowseResult) -> str:
    """A table of the variables, one line each, after a line saying what was walked."""
    writable = sum(1 for v in result.variables if v.writable)
    head = (f"{result.endpoint}: {len(result.variables)} variables ({writable} writable) among {result.nodes} "
            f"nodes; read-only browse, nothing was written")
    if result.left_out:
        head += f"\n(left out the standard objects {', '.join(result.left_out)}; --include-server lists them)"
    rows = [[v.path, v.type + ("[]" if v.array else ""), "rw" if v.writable else ("r" if v.readable else "-"),
             _short(v.value), v.status, v.node] for v in result.variables]
    return head + "\n\n" + table(["path", "type", "access", "value", "status", "node"], rows)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.7g}"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:39] + "…"


# ------------------------------------------------------------------------------------ probe


def probe_json(probe: Probe) -> dict[str, Any]:
    """``registers`` (the raw values; 0/1 for bits) and ``decoded`` (address, type, word_order,
    byte_order, value, plausible), with where and what was read."""
    target = probe.target
    return {
        "device": target.where, "unit": target.unit, "table": probe.table, "address": probe.address,
        "count": len(probe.registers), "registers": list(probe.registers),
        "decoded": [{"address": d.address, "type": d.type, "word_order": d.word_order, "byte_order": d.byte_order,
                     "value": _json_number(d.value), "plausible": d.plausible} for d in probe.decoded],
    }


def _json_number(value: int | float) -> int | float | bool | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity
    return value


def probe_text(probe: Probe) -> str:
    """The registers, then every 32- and 64-bit decoding (``*`` = plausible), then the likely floats."""
    target, last = probe.target, probe.address + len(probe.registers) - 1
    head = (f"modbus {target.where} unit {target.unit}: {probe.table} {probe.address}..{last}, "
            f"read once; nothing was written")
    if probe.bits:
        return head + "\n\n" + table(["address", "value"], [[str(d.address), str(int(d.value))]
                                                           for d in probe.decoded])
    parts = [head, _registers_table(probe)]
    for width, title in ((2, "32-bit"), (4, "64-bit")):
        rows = [d for d in probe.decoded if WIDTHS[d.type] == width]
        if rows:
            parts.append(f"{title} values from each address, every word and byte order (* plausible):\n"
                         + _wide_table(rows, width))
    parts.append(_likely(probe.decoded))
    return "\n\n".join(parts)


def _registers_table(probe: Probe) -> str:
    by_key = {(d.address, d.type, d.byte_order): d.value for d in probe.decoded if WIDTHS[d.type] == 1}
    rows = []
    for offset, register in enumerate(probe.registers):
        address = probe.address + offset
        rows.append([str(address), f"0x{register:04X}", str(by_key[address, "uint16", "big"]),
                     str(by_key[address, "int16", "big"]), str(by_key[address, "uint16", "little"]),
                     str(by_key[address, "int16", "little"])])
    return ("registers (byte order big as the Modbus spec has it; little = the two bytes swapped):\n"
            + table(["address", "hex", "uint16", "int16", "uint16 little", "int16 little"], rows))


def _wide_table(decoded: Sequence[Decoding], width: int) -> str:
    kinds = [k for k, w in WIDTHS.items() if w == width]
    grouped: dict[tuple[int, str, str], dict[str, Decoding]] = {}
    for d in decoded:
        grouped.setdefault((d.address, d.word_order, d.byte_order), {})[d.type] = d
    rows = []
    for (address, word, byte), by_kind in grouped.items():
        label = [LABELS[word, byte]] if width == 2 else []
        rows.append([str(address), *label, word, byte, *(_value(by_kind[k]) for k in kinds)])
    headers = ["address", *(["order"] if width == 2 else []), "word", "byte", *kinds]
    return table(headers, rows)


def _value(d: Decoding) -> str:
    if isinstance(d.value, float):
        text = f"{d.value:.7g}" if d.type == "float32" else f"{d.value:.15g}"
    else:
        text = str(d.value)
    return text + (" *" if d.plausible else "")


def _likely(decoded: Sequence[Decoding]) -> str:
    """The plausible non-zero floats, one line per type and order, so a layout shows as a pattern
    (every other address in one order is a run of float32s)."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for d in decoded:
        if d.type.startswith("float") and d.plausible and d.value != 0:
            groups.setdefault((d.type, d.word_order, d.byte_order), []).append(f"{d.address}={_value(d)[:-2]}")
    if not groups:
        return "plausible non-zero floats: none"
    lines = ["plausible non-zero floats, by type and order (address=value):"]
    for (kind, word, byte), found in sorted(groups.items(), key=lambda item: (WIDTHS[item[0][0]], -len(item[1]))):
        label = f" {LABELS[word, byte]}" if kind == "float32" else ""
        lines.append(f"  {kind}{label} word_order={word} byte_order={byte}: {'  '.join(found)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ check-config --probe


def check_text(checks: Sequence[DeviceCheck]) -> str:
    """Per device whether it answered, and per point its quality and value."""
    lines = []
    for check in checks:
        if check.error is not None:
            lines.append(f"{check.device} ({check.protocol}): FAILED: {check.error}")
            continue
        bad = sum(1 for r in check.readings if r.quality == BAD)
        lines.append(f"{check.device} ({check.protocol}): connected, {len(check.readings)} points read"
                     + (f", {bad} bad" if bad else ""))
        lines += ["  " + line for line in table(["point", "quality", "value"], [_reading_row(r)
                                                                               for r in check.readings]).splitlines()]
    return "\n".join(lines)


def _reading_row(reading: Reading) -> list[str]:
    return [reading.point, reading.quality, _short(reading.value)]


# ------------------------------------------------------------------------------------ tables


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a header line first."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)
