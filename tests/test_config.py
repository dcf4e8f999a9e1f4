"""Config validation: the issue's sample loads; every golden bad case fails with its exact text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.config import ModbusDevice, OpcUaDevice
from edge_agent.config.table import parse_duration
from edge_agent.errors import ConfigError

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
