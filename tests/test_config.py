"""Config validation: the issue's sample loads; every golden bad case fails with its exact text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drivers import opcua_pki
from edge_agent import config
from edge_agent.config import ModbusDevice, OpcUaDevice
from edge_agent.config.table import parse_duration
from edge_agent.errors import ConfigError
from tests import builders

HERE = Path(__file__).parent
CASES = sorted(p for p in (HERE / "testcases" / "config").iterdir() if p.is_dir())
ROOT = HERE.parent


def test_issue_sample_loads_unchanged() -> None:
    cfg = config.load(HERE / "testcases" / "issue2-sample.toml")
    assert cfg.agent.id == "gw-01" and cfg.agent.site == "plant-a"
    assert cfg.agent.data_dir == (HERE / "testcases" / "data").resolve()
    assert cfg.twin.history_retention == 7 * 86400
    chiller, pump = cfg.devices
    assert isinstance(chiller, OpcUaDevice) and isinstance(pump, ModbusDevice)
    assert chiller.mode == "subscribe" and chiller.interval == 1.0
    setpoint = chiller.points[1]
    assert (setpoint.writable, setpoint.min, setpoint.max, setpoint.max_step, setpoint.min_interval) == (
        True, 5.0, 12.0, 0.5, 30.0)
    flow = pump.points[0]
    assert (flow.register, flow.address, flow.type, flow.word_order, flow.width) == ("holding", 0, "float32", "big", 2)
    assert pump.port == 502 and pump.unit_id == 1


@pytest.mark.parametrize("sample", ["config/agent.example.toml", "edge_agent/demo/demo.toml"])
def test_shipped_configs_load(sample: str) -> None:
    cfg = config.load(ROOT / sample)
    assert cfg.devices, f"{sample} configures no devices"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_config_golden(case: Path) -> None:
    """check-config exits 2 and prints exactly the expected problems, one line each.

    An expected line ending in "..." matches by prefix (tomllib's own wording varies by Python version).
    """
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check-config", "--config", "agent.toml"],
                            cwd=case, capture_output=True, text=True, timeout=60)
    expected = (case / "expected.txt").read_text().splitlines()
    got = [line.removeprefix("error: ") for line in result.stderr.splitlines()]
    assert len(got) == len(expected), result.stderr
    for want, line in zip(expected, got, strict=True):
        if want.endswith("..."):
            assert line.startswith(want[:-3]), line
        else:
            assert line == want
    assert result.returncode == 2


def test_check_config_ok_exit_zero() -> None:
    result = subprocess.run([sys.executable, "-m", "edge_agent.cli", "check-config", "--config",
                             str(HERE / "testcases" / "issue2-sample.toml")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ok (2 devices, 3 points" in result.stdout


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nope.toml")
    assert info.value.problems == [f"{tmp_path / 'nope.toml'}: no such file"]


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("10s", 10), ("5m", 300), ("2h", 7200),
                                                ("7d", 604800), ("1.5s", 1.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "7 days", "-1s", "1w", "s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_issue14_keys_load_with_their_defaults(tmp_path: Path) -> None:
    pinned = opcua_pki.ensure_client_certificate(tmp_path / "certs", "urn:plc:server", "plc").cert_path
    doc = builders.config(tmp_path / "data", devices=[
        builders.opcua("plc1", "opc.tcp://127.0.0.1:4840/", [builders.point("plc1.a", node="ns=2;s=A")],
                       security="Basic256Sha256,Sign", server_certificate="certs/pki/client_cert.der"),
        builders.opcua("plc2", "opc.tcp://127.0.0.1:4841/", [builders.point("plc2.a", node="ns=2;s=A")],
                       security="Basic256Sha256,SignAndEncrypt"),
        builders.modbus("m1", [builders.point("m1.e", address=0, type="float32", word_order="little",
                                              byte_order="little"),
                               builders.point("m1.f", address=2, type="float32")]),
        builders.modbus("m2", [builders.point("m2.e", address=0)], connection="shared"),
        {"name": "r1", "protocol": "modbus-rtu", "serial_port": "/dev/ttyUSB0", "unit_id": 1, "baudrate": 9600,
         "points": [builders.point("r1.e", address=0)]},
        {"name": "r2", "protocol": "modbus-rtu", "serial_port": "/dev/ttyUSB0", "unit_id": 2, "baudrate": 9600,
         "points": [builders.point("r2.e", address=0)]},
    ])
    cfg = builders.load(doc, tmp_path / "agent.toml")
    plc1, plc2, m1, m2, r1, r2 = cfg.devices
    assert isinstance(plc1, OpcUaDevice) and isinstance(plc2, OpcUaDevice)
    assert plc1.server_certificate == pinned.resolve()  # relative to the config file's folder
    assert plc2.server_certificate is None  # trust on first use
    assert isinstance(m1, ModbusDevice)
    assert [(p.word_order, p.byte_order) for p in m1.points] == [("little", "little"), ("big", "big")]
    assert isinstance(m2, ModbusDevice) and (m1.connection, m2.connection) == ("own", "shared")
    assert isinstance(r1, ModbusDevice) and isinstance(r2, ModbusDevice)
    assert (r1.serial_port, r1.baudrate) == (r2.serial_port, r2.baudrate)  # one line, the same settings: fine
