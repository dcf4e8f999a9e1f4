"""ONNX runtime: contracts, the data-quality gate, hysteresis, hot swap; with real onnxruntime sessions."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from drivers.base import Reading
from edge_agent import config
from edge_agent.cloud import payloads
from edge_agent.config import ModelConfig
from edge_agent.control.inference import Hysteresis, ModelRunner, load
from edge_agent.errors import ConfigError, ModelError
from edge_agent.store.messages import Stamp
from tests import builders
from tests.helpers import wait_for
from tests.onnx_models import linear_model, zscore_model

POINTS = ["chiller1.supply_temp", "chiller1.power"]


def model_cfg(path: Path, **overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {"name": "health", "kind": "anomaly", "file": path, "interval": 0.1}
    values.update(overrides)
    return ModelConfig(**values)


class Plantish:
    """Current readings a runner sees, and what it reports."""

    def __init__(self) -> None:
        self.now: dict[str, Reading] = {}
        self.submitted: list[Reading] = []
        self.events: list[dict[str, Any]] = []

    def set(self, supply: Any, power: Any, quality: str = "good", age: float = 0.0) -> None:
        ts = time.time() - age
        self.now.update({POINTS[0]: Reading(POINTS[0], supply, quality, ts),
                         POINTS[1]: Reading(POINTS[1], power, "good", ts)})

    def runner(self, cfg: ModelConfig) -> ModelRunner:
        return ModelRunner(cfg, self.now.get, self.submitted.extend, self.events.append, "chiller1", known=POINTS)


@pytest.fixture
def zscore(tmp_path: Path) -> Path:
    return zscore_model(tmp_path / "z.onnx", [7.0, 60.0], [0.5, 5.0], inputs=POINTS, threshold=4.0)


def test_metadata_supplies_inputs_and_threshold(zscore: Path) -> None:
    loaded = load(model_cfg(zscore))
    assert loaded.inputs == tuple(POINTS) and loaded.threshold == 4.0


@pytest.mark.parametrize(("build", "overrides", "message"), [
    (lambda p: zscore_model(p, [1, 2, 3], [1, 1, 1], threshold=1), {"inputs": tuple(POINTS)},
     'model "health": the file takes 3 inputs, the config names 2'),
    (lambda p: zscore_model(p, [1, 2], [1, 1], threshold=1, dtype=TensorProto.DOUBLE), {"inputs": tuple(POINTS)},
     'model "health": expected a float32 input, the file\'s "x" is tensor(double)'),
    (lambda p: zscore_model(p, [1, 2], [1, 1]), {"inputs": tuple(POINTS)},
     'model "health": no threshold in the config or the file\'s metadata'),
    (lambda p: zscore_model(p, [1, 2], [1, 1], threshold=1), {},
     'model "health": no inputs: set inputs = [...] in the config or "inputs" in the file\'s metadata'),
    (lambda p: zscore_model(p, [1, 2], [1, 1], inputs=["a", "b"], threshold=1), {"inputs": tuple(POINTS)},
     "model \"health\": config inputs ['chiller1.supply_temp', 'chiller1.power'] differ from the file's "
     "metadata ['a', 'b']"),
    (lambda p: zscore_model(p, [1, 2], [1, 1], threshold=1, window=4), {"inputs": tuple(POINTS)},
     'model "health": expected input shape [batch, n_inputs], the file has [\'batch\', 4, 2]'),
    (lambda p: linear_model(p, [[1, 0], [0, 1]], [0, 0], inputs=POINTS, outputs=["y"]), {"kind": "simulation"},
     'model "health": expected one [batch, 1] output or 1 outputs of [batch], got [[2, 2]] (y)'),
])
def test_contract_mismatches_name_the_model_and_the_problem(tmp_path: Path, build: Any, overrides: dict[str, Any],
                                                             message: str) -> None:
    path = build(tmp_path / "m.onnx")
    with pytest.raises(ModelError) as info:
        load(model_cfg(path, **overrides))
    assert str(info.value) == message


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r'^model "health": cannot load .*bad\.onnx'):
        load(model_cfg(bad, inputs=tuple(POINTS), threshold=1.0))


async def test_stale_bad_and_implausible_inputs_block_scoring(zscore: Path) -> None:
    plant = Plantish()
    runner = plant.runner(model_cfg(zscore, max_input_age=5.0, plausible={POINTS[1]: (0.0, 500.0)}))
    runner.model = load(runner.cfg)
    plant.set(7.0, 60.0, age=60.0)
    assert await runner.evaluate() is None
    plant.set(7.0, 60.0, quality="stale")
    assert await runner.evaluate() is None
    plant.set(7.0, 900.0)
    assert await runner.evaluate() is None
    assert runner.status.evaluations == 0 and sum(runner.status.skips.values()) == 3
    assert "outside its plausible range 0..500" in runner.status.last_skip
    assert plant.submitted == []
    plant.set(7.5, 60.0)
    assert await runner.evaluate() == pytest.approx(1.0)
    assert plant.submitted[-1][:3] == ("health.score", pytest.approx(1.0), "good")


async def test_hysteresis_raises_after_n_and_clears_after_m(zscore: Path) -> None:
    plant = Plantish()
    runner = plant.runner(model_cfg(zscore, raise_after=3, clear_after=2))
    runner.model = load(runner.cfg)
    plant.set(9.0, 60.0)  # score 16 > 4
    for _ in range(2):
        await runner.evaluate()
    assert plant.events == [] and not runner.anomaly_active
    await runner.evaluate()
    assert [e["state"] for e in plant.events] == ["raised"] and runner.anomaly_active
    assert plant.events[0]["source"] == "health" and plant.events[0]["score"] == pytest.approx(16.0)
    plant.set(7.0, 60.0)
    await runner.evaluate()
    plant.set(9.0, 60.0)  # one high score resets the count of lows
    await runner.evaluate()
    plant.set(7.0, 60.0)
    await runner.evaluate()
    assert runner.anomaly_active
    await runner.evaluate()
    assert [e["state"] for e in plant.events] == ["raised", "cleared"] and not runner.anomaly_active


def strict_json(payload: bytes) -> Any:
    """Parse as JSON proper: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in a payload")
    return json.loads(payload, parse_constant=refuse)


async def test_bad_values_never_clear_an_anomaly(zscore: Path) -> None:
    """NaN at good quality used to score NaN, count as "below the threshold" and clear the anomaly;
    a string raised ValueError. Neither produces a score now, and only clean scores in a row clear it."""
    plant = Plantish()
    runner = plant.runner(model_cfg(zscore, raise_after=1, clear_after=2))
    runner.model = load(runner.cfg)
    plant.set(9.0, 60.0)
    assert await runner.evaluate() == pytest.approx(16.0) and runner.anomaly_active
    for bad, why in ((math.nan, "nan is not a finite number"), (math.inf, "inf is not a finite number"),
                     (-math.inf, "-inf is not a finite number"), ("abc", "'abc' is not a finite number"),
                     ("7.0", "'7.0' is not a finite number"), (1e300, "1e+300 is beyond float32's range")):
        plant.set(bad, 60.0)
        for _ in range(3):
            assert await runner.evaluate() is None, bad
        assert runner.anomaly_active, bad
        assert runner.status.last_skip == f"chiller1.supply_temp = {why}"
    plant.set(7.0, 60.0)
    assert await runner.evaluate() == pytest.approx(0.0)  # one clean score ...
    plant.set(math.nan, 60.0)
    assert await runner.evaluate() is None  # ... interrupted: the count of clean scores starts again
    plant.set(7.0, 60.0)
    await runner.evaluate()
    assert runner.anomaly_active
    await runner.evaluate()
    assert not runner.anomaly_active
    assert [e["state"] for e in plant.events] == ["raised", "cleared"]
    assert all(math.isfinite(r.value) for r in plant.submitted)  # type: ignore[arg-type]
    for event in plant.events:  # as published: valid JSON, the score a number
        body = strict_json(payloads.event("gw", Stamp(1), "anomaly", event))
        assert isinstance(body["score"], float) and body["state"] == event["state"]


def test_event_payloads_are_json_whatever_they_carry() -> None:
    body = strict_json(payloads.event("gw", Stamp(3), "anomaly", {"score": math.nan, "detail": {"x": [math.inf]}}))
    assert (body["score"], body["detail"]) == (None, {"x": [None]})


async def test_the_model_task_survives_any_value(zscore: Path) -> None:
    """A string input (an OPC UA String node) used to raise an uncaught ValueError that ended the task."""
    plant = Plantish()
    runner = plant.runner(model_cfg(zscore, interval=0.02))
    plant.set("n/a", 60.0)
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(lambda: sum(runner.status.skips.values()) >= 5, timeout=20, what="five skipped evaluations")
        assert not task.done() and runner.status.evaluations == 0
        plant.set(8.0, 60.0)
        await wait_for(lambda: runner.status.evaluations >= 2, timeout=20, what="scores once the input is a number")
        assert not task.done() and runner.status.last_score == pytest.approx(4.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_hysteresis_unit() -> None:
    h = Hysteresis(raise_after=2, clear_after=1)
    assert [h.update(x) for x in (True, False, True, True, True, False)] == [None, None, None, "raised", None,
                                                                             "cleared"]


async def test_broken_replacement_leaves_the_old_model_running(zscore: Path, tmp_path: Path) -> None:
    plant = Plantish()
    runner = plant.runner(model_cfg(zscore))
    runner.model = load(runner.cfg)
    plant.set(8.0, 60.0)
    assert await runner.evaluate() == pytest.approx(4.0)
    with pytest.raises(ModelError, match="cannot load"):
        await runner.swap(b"\x08\x01garbage", "update deadbeef")
    wrong = zscore_model(tmp_path / "wrong.onnx", [1, 2, 3], [1, 1, 1], inputs=["a", "b", "c"], threshold=1)
    with pytest.raises(ModelError, match=r"its inputs \['a', 'b', 'c'\] are not configured points"):
        await runner.swap(wrong.read_bytes(), "update wrong-shape")
    assert await runner.evaluate() == pytest.approx(4.0)  # still the original
    better = zscore_model(tmp_path / "new.onnx", [8.0, 60.0], [1.0, 5.0], inputs=POINTS, threshold=4.0)
    await runner.swap(better.read_bytes(), "update v2")
    assert await runner.evaluate() == pytest.approx(0.0) and runner.model is not None
    assert runner.model.source == "update v2"


async def test_windowed_model_scores_once_the_window_is_full(tmp_path: Path) -> None:
    path = zscore_model(tmp_path / "w.onnx", [7.0, 60.0], [0.5, 5.0], inputs=POINTS, threshold=4.0, window=3)
    plant = Plantish()
    runner = plant.runner(model_cfg(path, window=3))
    runner.model = load(runner.cfg)
    plant.set(8.0, 60.0)
    assert [await runner.evaluate() for _ in range(4)] == [None, None, pytest.approx(4.0), pytest.approx(4.0)]


async def test_simulation_model_predicts_named_outputs(tmp_path: Path) -> None:
    path = linear_model(tmp_path / "sim.onnx", [[1.0, 0.0], [0.0, 2.0]], [0.0, 1.0], inputs=POINTS,
                        outputs=["power", "supply"])
    runner = Plantish().runner(model_cfg(path, name="sim", kind="simulation"))
    runner.model = load(runner.cfg)
    out = await runner.predict(np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert out["power"].tolist() == [1.0, 3.0] and out["supply"].tolist() == [5.0, 9.0]


def test_models_config_validation(tmp_path: Path) -> None:
    power = builders.point("chiller1.power", node="ns=1;s=P")
    chiller = builders.opcua("chiller1", "opc.tcp://127.0.0.1:4840", [power])
    health = builders.model("m", "anomly", tmp_path / "x.onnx", inputs=["chiller1.power", "chiller1.nope"],
                            plausible={"chiller1.power": [5, 1]})
    text = builders.toml({"devices": [chiller], "models": [health]})
    with pytest.raises(ConfigError) as info:
        config.loads(text, tmp_path / "agent.toml")
    problems = [p.split(": ", 1)[1] for p in info.value.problems]
    assert problems == [
        'models[0].kind: expected one of anomaly, simulation, got "anomly"',
        "models[0].plausible.chiller1.power: expected [min, max] with min < max, got [5, 1]",
        'models[0].inputs: no point named "chiller1.nope" is configured',
    ]
