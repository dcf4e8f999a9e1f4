"""``edge-agent probe modbus`` against a real pymodbus server (TCP, and RTU framing over a socket URL),
and the pure decoder under it.

The server's ``trace_pdu`` hook records every request that arrives, so "read-only" is asserted on
the wire: only read function codes, and the registers unchanged.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent import cli
from edge_agent.commission.decode import LABELS, WIDTHS, decode, plausible, value_of
from tests import builders
from tests.helpers import free_port

UNIT = 1
READ_CODES = (1, 2, 3, 4)

# One float32 in each of the four orders, two registers each from holding 0, chosen so that at
# each address only the right order decodes to a plausible value.
FLOATS = (("ABCD", 21.5), ("CDAB", -1234.5677), ("BADC", 230.1), ("DCBA", 1013.25))
ORDER_OF = {label: order for order, label in LABELS.items()}  # "CDAB" -> ("little", "big")


def registers_for(value: float, label: str, kind: str = "float32") -> list[int]:
    """``value`` as registers in the order ``label`` (ABCD...), built byte by byte, independently of
    the decoder: the bytes of the big-endian encoding, pairs reordered as the label says."""
    data = struct.pack(">f" if kind == "float32" else ">d", value)
    width = len(data) // 2
    word, byte = ORDER_OF[label]
    words = [data[2 * i:2 * i + 2] for i in range(width)]
    if word == "little":
        words.reverse()
    if byte == "little":
        words = [w[::-1] for w in words]
    return [w[0] << 8 | w[1] for w in words]


class Device:
    """A pymodbus server, unit 1: holding 0..99 (the four floats at 0..7, then 8..15 zero, 16..99
    counting up), input 0..9, coils 0..15 (1, 0, 1, 0...); holding 100.. is not there. ``requests``
    holds (function code, address, count) of every request on the wire."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[int, int, int]] = []
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        floats = [r for label, value in FLOATS for r in registers_for(value, label)]
        self.holding = floats + [0] * 8 + list(range(16, 400))
        self.inputs = [7, 65535, 32768, 1, 0, 0, 0, 0, 0, 0]
        self.coils = [i % 2 == 0 for i in range(16)]

    def simulated(self) -> SimDevice:
        return SimDevice(id=UNIT, simdata=(
            [SimData(0, values=self.coils, datatype=DataType.BITS)],
            [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(0, values=self.holding[:100], datatype=DataType.REGISTERS),
             SimData(200, values=self.holding[200:400], datatype=DataType.REGISTERS)],
            [SimData(0, values=self.inputs, datatype=DataType.REGISTERS)],
        ))

    def _record(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests.append((pdu.function_code, pdu.address, pdu.count))
        return pdu

    async def holding_now(self, count: int = 16) -> list[int]:
        assert self.server is not None
        return list(await self.server.async_getValues(UNIT, 3, 0, count))


@asynccontextmanager
async def modbus_device(rtu: bool = False) -> AsyncIterator[Device]:
    device = Device()
    if rtu:
        device.server = ModbusSerialServer(device.simulated(), port=f"socket://127.0.0.1:{device.port}",
                                           trace_pdu=device._record)
    else:
        device.server = ModbusTcpServer(device.simulated(), address=("127.0.0.1", device.port),
                                        trace_pdu=device._record)
    await device.server.serve_forever(background=True)
    try:
        yield device
    finally:
        await device.server.shutdown()


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The real CLI in a worker thread (it runs its own event loop) while the server serves on ours."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def decoded_at(body: dict, address: int, kind: str) -> dict[str, dict]:
    """The decodings of ``kind`` at ``address``, by order label."""
    return {LABELS[d["word_order"], d["byte_order"]]: d for d in body["decoded"]
            if d["address"] == address and d["type"] == kind}


# --------------------------------------------------------------------------------------- the CLI


async def test_probe_finds_a_float32_in_each_of_the_four_orders(capsys: pytest.CaptureFixture[str]) -> None:
    async with modbus_device() as device:
        code, out, _ = await run_cli(capsys, "probe", "modbus", f"127.0.0.1:{device.port}",
                                     "--address", "0", "--count", "8", "--json")
        assert code == 0
        body = json.loads(out)
        assert body["registers"] == device.holding[:8]
        for index, (label, value) in enumerate(FLOATS):
            at = decoded_at(body, 2 * index, "float32")
            assert set(at) == {"ABCD", "CDAB", "BADC", "DCBA"}
            assert at[label]["value"] == struct.unpack(">f", struct.pack(">f", value))[0]
            assert at[label]["plausible"] is True, (label, at[label])
            assert [other for other, d in at.items() if d["plausible"]] == [label]  # the only one

        text_code, text, _ = await run_cli(capsys, "probe", "modbus", f"127.0.0.1:{device.port}",
                                           "--address", "0", "--count", "8")
        assert text_code == 0
        assert "nothing was written" in text
        assert "float32 ABCD word_order=big byte_order=big: 0=21.5" in text
        assert "float32 CDAB word_order=little byte_order=big: 2=-1234.568" in text
        assert "float32 BADC word_order=big byte_order=little:" in text and "4=230.1" in text
        assert "float32 DCBA word_order=little byte_order=little:" in text and "6=1013.25" in text

        # read-only on the wire: only read requests arrived, and the registers are as they were
        assert {fc for fc, _, _ in device.requests} == {3}
        assert await device.holding_now() == device.holding[:16]


async def test_probe_json_shape_every_type_in_every_order(capsys: pytest.CaptureFixture[str]) -> None:
    async with modbus_device() as device:
        code, out, _ = await run_cli(capsys, "probe", "modbus", f"127.0.0.1:{device.port}", "--table", "input",
                                     "--address", "0", "--count", "4", "--json")
    assert code == 0
    body = json.loads(out)
    assert (body["table"], body["address"], body["unit"], body["registers"]) == ("input", 0, 1, [7, 65535, 32768, 1])
    for entry in body["decoded"]:
        assert set(entry) >= {"address", "type", "word_order", "byte_order", "value"}
        assert entry["word_order"] in ("big", "little") and entry["byte_order"] in ("big", "little")
    kinds: dict[str, int] = {}
    for entry in body["decoded"]:
        kinds[entry["type"]] = kinds.get(entry["type"], 0) + 1
    # 4 addresses x 2 byte orders; 3 pairs x 4 orders; 1 quadruple x 4 orders
    assert kinds == {"int16": 8, "uint16": 8, "int32": 12, "uint32": 12, "float32": 12,
                     "int64": 4, "uint64": 4, "float64": 4}
    sixteen = {(d["address"], d["type"], d["byte_order"]): d["value"] for d in body["decoded"]
               if d["type"] in ("int16", "uint16")}
    assert sixteen[1, "int16", "big"] == -1 and sixteen[1, "uint16", "big"] == 65535
    assert sixteen[0, "uint16", "little"] == 7 << 8  # bytes swapped
    assert sixteen[2, "int16", "big"] == -32768 and sixteen[2, "int16", "little"] == 128
    int32 = decoded_at(body, 2, "int32")
    assert int32["ABCD"]["value"] == (32768 << 16 | 1) - (1 << 32)
    assert int32["CDAB"]["value"] == (1 << 16 | 32768)
    assert all(d["word_order"] == "big" for d in body["decoded"] if d["type"] in ("int16", "uint16"))


async def test_probe_reads_bits_and_long_ranges_in_spec_sized_requests(capsys: pytest.CaptureFixture[str]) -> None:
    async with modbus_device() as device:
        code, out, _ = await run_cli(capsys, "probe", "modbus", f"127.0.0.1:{device.port}", "--table", "coil",
                                     "--address", "0", "--count", "5", "--json")
        assert code == 0
        body = json.loads(out)
        assert body["registers"] == [1, 0, 1, 0, 1]
        assert [(d["address"], d["type"], d["value"]) for d in body["decoded"]] == [
            (0, "bool", True), (1, "bool", False), (2, "bool", True), (3, "bool", False), (4, "bool", True)]

        device.requests.clear()
        code, out, _ = await run_cli(capsys, "probe", "modbus", f"127.0.0.1:{device.port}",
                                     "--address", "200", "--count", "130", "--json")
        assert code == 0
        assert json.loads(out)["registers"] == device.holding[200:330]
        assert device.requests == [(3, 200, 125), (3, 325, 5)]


async def test_probe_over_rtu(capsys: pytest.CaptureFixture[str]) -> None:
    async with modbus_device(rtu=True) as device:
        code, out, _ = await run_cli(capsys, "probe", "modbus", "--serial", f"socket://127.0.0.1:{device.port}",
                                     "--baudrate", "9600", "--parity", "N", "--address", "0", "--count", "2",
                                     "--json")
        assert code == 0
        body = json.loads(out)
        assert body["device"] == f"socket://127.0.0.1:{device.port}"
        assert decoded_at(body, 0, "float32")["ABCD"]["value"] == 21.5
        assert {fc for fc, _, _ in device.requests} == {3}


async def test_probe_errors_name_the_device_and_the_cause(capsys: pytest.CaptureFixture[str]) -> None:
    async with modbus_device() as device:
        code, _, err = await run_cli(capsys, "probe", "modbus", f"127.0.0.1:{device.port}",
                                     "--address", "120", "--count", "10")
        assert code == 1
        assert (f"holding 120..129 of unit 1 at 127.0.0.1:{device.port}: the device answered exception code 2 "
                "(illegal data address)") in err
    closed = free_port()
    code, _, err = await run_cli(capsys, "probe", "modbus", f"127.0.0.1:{closed}", "--address", "0", "--count", "1",
                                 "--timeout", "1s")
    assert code == 1
    assert f"cannot connect to 127.0.0.1:{closed}" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--address", "0", "--count", "2"], "give either HOST:PORT (TCP) or --serial PORT (RTU)"),
    (["127.0.0.1:502", "--serial", "/dev/ttyUSB0", "--address", "0", "--count", "2"], "give either"),
    (["127.0.0.1:502", "--address", "65535", "--count", "2"], "expected addresses within 0..65535"),
    (["127.0.0.1:502", "--address", "0", "--count", "0"], "expected addresses within 0..65535"),
    (["127.0.0.1:99999", "--address", "0", "--count", "2"], "port from 1 to 65535"),
    (["127.0.0.1:x", "--address", "0", "--count", "2"], "with a port number"),
    (["127.0.0.1", "--unit", "300", "--address", "0", "--count", "2"], "--unit: expected 0..255"),
    (["127.0.0.1", "--timeout", "soon", "--address", "0", "--count", "2"], "--timeout: expected a positive"),
])
def test_probe_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "modbus", *argv]) == 2
    assert message in capsys.readouterr().err


def test_probe_help_says_it_is_read_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["probe", "modbus", "--help"])
    assert "never writes to the device" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- the decoder


def test_value_of_in_each_order_matches_the_byte_layout() -> None:
    # 0x3FC00000 = 1.5: ABCD [3FC0 0000], CDAB [0000 3FC0], BADC [C03F 0000], DCBA [0000 C03F]
    assert value_of([0x3FC0, 0x0000], "float32", "big", "big") == 1.5
    assert value_of([0x0000, 0x3FC0], "float32", "little", "big") == 1.5
    assert value_of([0xC03F, 0x0000], "float32", "big", "little") == 1.5
    assert value_of([0x0000, 0xC03F], "float32", "little", "little") == 1.5
    assert value_of([0x0102, 0x0304, 0x0506, 0x0708], "uint64", "little", "big") == 0x0708050603040102
    assert value_of([0x0102, 0x0304, 0x0506, 0x0708], "uint64", "big", "little") == 0x0201040306050807
    assert value_of([0xFFFE], "int16", "big", "big") == -2
    assert value_of([0xFFFE], "int16", "big", "little") == -257
    with pytest.raises(ValueError, match=r"holds 0\.\.65535"):
        value_of([70000], "uint16")
    with pytest.raises(ValueError, match="needs 2 registers"):
        value_of([1], "float32")


@pytest.mark.parametrize(("kind", "value", "expected"), [
    ("float32", 21.5, True), ("float32", 0.0, True), ("float32", -0.0, True), ("float32", 7e-41, False),
    ("float32", 1e-12, False), ("float32", 3e12, False), ("float32", math.nan, False), ("float32", math.inf, False),
    ("float64", 4.9e-324, False), ("float64", 1e-6, True), ("int16", -32768, True), ("uint16", 65535, True),
    ("int32", 1_101_791_232, False), ("int32", -5000, True), ("uint64", 2**60, False), ("int64", 10**12, True),
])
def test_plausible(kind: str, value: float, expected: bool) -> None:
    assert plausible(kind, value) is expected


def test_decode_lists_every_type_and_order_per_address() -> None:
    decoded = decode([1, 2, 3, 4, 5], start=10)
    per_width = {w: sum(1 for d in decoded if WIDTHS[d.type] == w) for w in (1, 2, 4)}
    assert per_width == {1: 5 * 2 * 2, 2: 4 * 3 * 4, 4: 2 * 3 * 4}
    assert [d.address for d in decoded] == sorted(d.address for d in decoded)  # address order
    assert (decoded[0].address, decoded[-1].address, decoded[-1].type) == (10, 14, "uint16")
    assert {(d.word_order, d.byte_order) for d in decoded if d.type == "float64"} == set(LABELS)


@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from(sorted(ORDER_OF)))
def test_a_float32_comes_back_from_its_own_order(value: float, label: str) -> None:
    word, byte = ORDER_OF[label]
    assert value_of(registers_for(value, label), "float32", word, byte) == value


@given(st.floats(min_value=1e-3, max_value=1e6) | st.floats(min_value=-1e6, max_value=-1e-3),
       st.sampled_from(sorted(ORDER_OF)))
def test_a_typical_measurement_is_marked_plausible_in_its_own_order(value: float, label: str) -> None:
    registers: Sequence[int] = registers_for(value, label, "float64")
    word, byte = ORDER_OF[label]
    right = [d for d in decode(registers) if d.type == "float64" and (d.word_order, d.byte_order) == (word, byte)]
    assert len(right) == 1 and right[0].value == value and right[0].plausible


# --------------------------------------------------------------------------------------- check-config --probe


async def test_check_config_probe_reads_every_point_once_and_names_a_device_it_cannot_reach(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with modbus_device() as device:
        doc = builders.config(tmp_path / "data", devices=[
            builders.modbus("pump1", [
                builders.point("pump1.flow", address=0, type="float32"),
                builders.point("pump1.total", address=2, type="float32", word_order="little"),
                builders.point("pump1.speed", address=20, type="uint16", writable=True, min=0.0, max=100.0),
                builders.point("pump1.run", register="coil", address=0),
            ], port=device.port),
            builders.modbus("pump2", [builders.point("pump2.flow", address=0)], port=free_port(), timeout="1s"),
        ])
        config = builders.write(doc, tmp_path / "agent.toml")
        code, out, _ = await run_cli(capsys, "check-config", "--config", str(config), "--probe")
        assert code == 1  # pump2 cannot be reached
        rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  pump1.")}
        assert rows == {"pump1.flow": ["good", "21.5"], "pump1.total": ["good", "-1234.568"],
                        "pump1.speed": ["good", "20"], "pump1.run": ["good", "true"]}
        assert "pump1 (modbus): connected, 4 points read" in out
        assert f"pump2 (modbus): FAILED: cannot connect to 127.0.0.1:{doc['devices'][1]['port']}" in out
        assert {fc for fc, _, _ in device.requests} <= set(READ_CODES)  # a writable point, and still no write
        assert await device.holding_now(21) == device.holding[:21]

        seen = len(device.requests)
        code, out, _ = await run_cli(capsys, "check-config", "--config", str(config))
        assert code == 0 and "pump1.flow" not in out
        assert len(device.requests) == seen  # without --probe no device is contacted
