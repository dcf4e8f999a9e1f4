"""The models shipped in models/, run with the real onnxruntime on rows from the real plant physics."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.demo.physics import PlantModel
from tests.unavailable import unavailable

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
ANOMALY = MODELS / "chiller_anomaly.onnx"
SIM = MODELS / "chiller_sim.onnx"
# Metadata that must not depend on how much data a build used.
STABLE_KEYS = ("kind", "name", "inputs", "units", "outputs", "residuals", "score", "interval", "decision_inputs",
               "horizon", "build_command", "card")


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def metadata(path: Path) -> dict[str, str]:
    return dict(session(path).get_modelmeta().custom_metadata_map)


def plant_rows(names: list[str], seconds: int, *, seed: int, setpoint: float = 7.0, speed: int = 1450,
               fault: str | None = None, fault_at: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One row of readings per simulated second (seeds far from the build's), and each row's fault age."""
    plant = PlantModel(seed)
    plant.chiller_setpoint, plant.pump_speed_setpoint = setpoint, speed
    rows, ages = [], []
    for second in range(seconds):
        if fault is not None and second == fault_at:
            plant.fault, plant.fault_age = fault, 0.0
        plant.step(1.0)
        rows.append([plant.readings[name] for name in names])
        ages.append(plant.fault_age if plant.fault else -1.0)
    return np.array(rows, dtype=np.float32), np.array(ages)


def score(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, residuals = session(ANOMALY).run(None, {"input": rows})
    return scores, residuals


def longest_streak(flags: np.ndarray) -> int:
    best = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


def test_shipped_files_are_small_and_self_describing() -> None:
    anomaly, sim = metadata(ANOMALY), metadata(SIM)
    assert ANOMALY.stat().st_size < 64_000 and SIM.stat().st_size < 64_000
    assert anomaly["kind"] == "anomaly" and sim["kind"] == "simulation"
    for meta in (anomaly, sim):
        inputs, units = json.loads(meta["inputs"]), json.loads(meta["units"])
        ranges = json.loads(meta["plausible_ranges"])
        assert set(inputs) <= set(units) and set(inputs) == set(ranges)
        assert all(low < high for low, high in ranges.values())
        assert meta["build_command"].startswith("python models/build.py")
        assert (MODELS / meta["card"]).is_file()


def test_anomaly_contract() -> None:
    sess, meta = session(ANOMALY), metadata(ANOMALY)
    inputs = json.loads(meta["inputs"])
    assert inputs[:4] == ["chiller1.supply_temp", "chiller1.return_temp", "chiller1.power", "chiller1.vibration"]
    assert json.loads(meta["units"])["chiller1.vibration"] == "mm/s"
    (tensor,) = sess.get_inputs()
    assert tensor.type == "tensor(float)" and tensor.shape == ["batch", len(inputs)]
    outputs = sess.get_outputs()
    assert [o.name for o in outputs] == json.loads(meta["outputs"]) == ["score", "residual_z"]
    assert outputs[0].shape == ["batch"]
    assert outputs[1].shape == ["batch", len(json.loads(meta["residuals"]))]
    assert 2.0 < float(meta["threshold"]) < 10.0


def test_sim_contract() -> None:
    sess, meta = session(SIM), metadata(SIM)
    inputs, outputs = json.loads(meta["inputs"]), json.loads(meta["outputs"])
    assert set(json.loads(meta["decision_inputs"])) == {"chiller1.setpoint", "pump1.speed_setpoint"} <= set(inputs)
    assert sess.get_inputs()[0].shape == ["batch", len(inputs)]
    assert [o.name for o in sess.get_outputs()] == outputs
    assert outputs[:2] == ["chiller1.power", "chiller1.supply_temp"]
    assert all(o.shape == ["batch"] for o in sess.get_outputs())
    assert meta["horizon"] == "300s"


@pytest.mark.parametrize(("setpoint", "speed"), [(7.0, 1450), (10.5, 1000)])
def test_anomaly_scores_held_out_normal_rows_under_threshold(setpoint: float, speed: int) -> None:
    meta = metadata(ANOMALY)
    rows, _ = plant_rows(json.loads(meta["inputs"]), 1200, seed=90_001, setpoint=setpoint, speed=speed)
    above = score(rows[120:])[0] > float(meta["threshold"])  # after the supply temperature settled
    assert above.mean() <= 0.005
    assert longest_streak(above) < 3


@pytest.mark.parametrize(("fault", "culprit"), [("vibration", "chiller1.vibration"),
                                                ("sensor_drift", "chiller1.return_temp")])
def test_anomaly_flags_a_developed_fault(fault: str, culprit: str) -> None:
    meta = metadata(ANOMALY)
    rows, ages = plant_rows(json.loads(meta["inputs"]), 600, seed=90_002, fault=fault, fault_at=300)
    scores, residuals = score(rows)
    developed = ages >= 60
    assert np.all(scores[developed] > float(meta["threshold"]))
    assert np.all(scores[120:300] < float(meta["threshold"]))  # before the fault
    worst = np.abs(residuals[developed]).argmax(axis=1)
    assert np.all(worst == json.loads(meta["residuals"]).index(culprit))


def test_sim_power_falls_as_the_setpoint_rises_at_constant_load() -> None:
    meta = metadata(SIM)
    inputs, outputs = json.loads(meta["inputs"]), json.loads(meta["outputs"])
    setpoints = np.linspace(5.0, 12.0, 29)
    state = {"chiller1.load": 320.0, "chiller1.supply_temp": 7.0, "pump1.speed_setpoint": 1450.0}
    rows = np.array([[sp if name == "chiller1.setpoint" else state[name] for name in inputs] for sp in setpoints],
                    dtype=np.float32)
    predicted = dict(zip(outputs, session(SIM).run(None, {"input": rows}), strict=True))
    power, supply = predicted["chiller1.power"], predicted["chiller1.supply_temp"]
    assert np.all(np.diff(power) < 0)
    assert power.min() > 40.0 and power.max() < 100.0
    assert 4.0 < power[0] - power[-1] < 25.0  # the plant: COP +2.8 %/degC, about 1.5 kW per degC here
    assert np.all(np.abs(supply - setpoints) < 0.5)
    assert np.all(np.abs(predicted["chiller1.return_temp"] - supply - 320.0 / (1.163 * 72.0)) < 0.8)


def test_sim_prediction_matches_the_plant_five_minutes_on() -> None:
    meta = metadata(SIM)
    inputs = json.loads(meta["inputs"])
    plant = PlantModel(90_003, steady_load=True)
    for _ in range(600):
        plant.step(1.0)
    row = np.array([[plant.readings[name] if name not in ("chiller1.setpoint", "pump1.speed_setpoint") else 0.0
                     for name in inputs]], dtype=np.float32)
    row[0, inputs.index("chiller1.setpoint")], row[0, inputs.index("pump1.speed_setpoint")] = 10.0, 1200.0
    plant.chiller_setpoint, plant.pump_speed_setpoint = 10.0, 1200
    for _ in range(int(meta["horizon"].removesuffix("s"))):
        plant.step(1.0)
    predicted = dict(zip(json.loads(meta["outputs"]), session(SIM).run(None, {"input": row}), strict=True))
    assert math.isclose(predicted["chiller1.power"][0], plant.chiller_power, rel_tol=0.08)
    assert math.isclose(predicted["chiller1.supply_temp"][0], plant.supply_temp, abs_tol=0.4)
    assert math.isclose(predicted["pump1.power"][0], plant.pump_power, rel_tol=0.1)


def test_quick_rebuild_gives_the_same_contracts(tmp_path: Path) -> None:
    if importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("onnx") is None:
        unavailable("scikit-learn and onnx (the models extra) are not installed; ./dev.sh setup installs them "
                    "(pip install -e '.[dev,models]')")
    result = subprocess.run([sys.executable, str(MODELS / "build.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    for name in ("chiller_anomaly", "chiller_sim"):
        shipped, rebuilt = metadata(MODELS / f"{name}.onnx"), metadata(tmp_path / f"{name}.onnx")
        assert rebuilt.keys() == shipped.keys()
        assert {k: rebuilt.get(k) for k in STABLE_KEYS} == {k: shipped.get(k) for k in STABLE_KEYS}
        old, new = session(MODELS / f"{name}.onnx"), session(tmp_path / f"{name}.onnx")
        assert [(o.name, o.shape) for o in new.get_outputs()] == [(o.name, o.shape) for o in old.get_outputs()]
        assert (tmp_path / f"{name}.card.md").read_text().startswith("# Model card")
