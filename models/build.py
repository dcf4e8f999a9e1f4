"""Build the shipped ONNX models from the simulated plant, reproducibly.

    python models/build.py [--out models/] [--quick] [--no-latency]

Runs ``edge_agent.demo.physics.PlantModel`` headless (no servers, one step per simulated second) with
an "operator" that moves the chiller and pump setpoints at random, then fits two small MLPs with
scikit-learn and writes them as hand-assembled ONNX graphs (opset 17, IR version 8, so any
onnxruntime from 1.13 on loads them):

* ``chiller_anomaly.onnx`` ("chiller-health"): predicts return temperature, power and vibration
  from supply temperature, load and loop flow; the score is the largest of the three residuals
  in units of their held-out standard deviation ("sigmas off").
* ``chiller_sim.onnx`` ("chiller-sim"): predicts chiller power, supply and return temperature and
  pump power five minutes ahead from the current state and candidate setpoints.

Every seed is fixed and BLAS runs on one thread while fitting, so a re-run writes the same
``.onnx`` bytes (the cards differ only in the measured latency). Quality is measured by running
the written files with onnxruntime on runs the models never saw, and goes into the cards.
``onnx`` and ``scikit-learn`` are build-time only; the agent needs onnxruntime.
``--quick`` builds from a fraction of the data (for the tests); it is not for shipping.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor
from threadpoolctl import threadpool_limits

from edge_agent.demo.physics import CHILLER_SETPOINT_RANGE, PlantModel

BUILD_COMMAND = "python models/build.py --out models/"
OPSET = 17
IR_VERSION = 8
STEP_S = 1.0            # one reading per point per simulated second, like the demo's 1 s polling
MAX_SKEW_S = 2          # each input may be up to 2 s older than the others (subscriptions vs polls)
HORIZON_S = 300
SPEED_SETPOINT_RANGE = (800, 1800)
HIDDEN = (24, 24)

POINTS = ("chiller1.supply_temp", "chiller1.return_temp", "chiller1.power", "chiller1.vibration",
          "chiller1.load", "chiller1.setpoint", "pump1.flow", "pump1.speed_setpoint", "pump1.power")
UNITS = {"chiller1.supply_temp": "degC", "chiller1.return_temp": "degC", "chiller1.power": "kW",
         "chiller1.vibration": "mm/s", "chiller1.load": "kW", "chiller1.setpoint": "degC",
         "pump1.flow": "m3/h", "pump1.speed_setpoint": "rpm", "pump1.power": "kW"}
COL = {name: i for i, name in enumerate(POINTS)}

ANOMALY_INPUTS = ("chiller1.supply_temp", "chiller1.return_temp", "chiller1.power", "chiller1.vibration",
                  "chiller1.load", "pump1.flow")
ANOMALY_DRIVERS = ("chiller1.supply_temp", "chiller1.load", "pump1.flow")
ANOMALY_CHECKED = ("chiller1.return_temp", "chiller1.power", "chiller1.vibration")
# Instrument ranges for the checked points and the supply temperature: a fault pushes them far
# from normal and the model must still score it, so only physically impossible values are refused.
INSTRUMENT_RANGES = {"chiller1.supply_temp": (0.0, 30.0), "chiller1.return_temp": (0.0, 40.0),
                     "chiller1.power": (0.0, 250.0), "chiller1.vibration": (0.0, 50.0)}

SIM_INPUTS = ("chiller1.load", "chiller1.supply_temp", "chiller1.setpoint", "pump1.speed_setpoint")
SIM_DECISIONS = ("chiller1.setpoint", "pump1.speed_setpoint")
SIM_OUTPUTS = ("chiller1.power", "chiller1.supply_temp", "chiller1.return_temp", "pump1.power")


@dataclass(frozen=True)
class Plan:
    """How much simulated plant to run: seeds are fixed per role, so the sets never overlap."""

    train_runs: int = 16
    train_s: int = 3 * 3600
    calib_runs: int = 6
    test_runs: int = 6
    heldout_s: int = 3600
    fault_runs: int = 8
    fault_s: int = 1800
    sim_states: int = 2400
    sim_candidates: int = 6
    effect_states: int = 60
    max_iter: int = 1000


FULL = Plan()
QUICK = Plan(train_runs=3, train_s=2400, calib_runs=2, test_runs=2, heldout_s=1200, fault_runs=2,
             fault_s=900, sim_states=60, effect_states=4, max_iter=200)
SEEDS = {"train": 1000, "calib": 2000, "test": 3000, "vibration": 4000, "sensor_drift": 5000, "effect": 6000,
         "branches": 7000}
BRANCH_EVERY_S = (60, 180)  # seconds between the states the simulation model's training branches from


# --------------------------------------------------------------------------- simulated data


@dataclass(frozen=True)
class Run:
    """One headless run: ``readings[i]`` holds every point of ``POINTS`` after second ``i + 1``."""

    readings: np.ndarray   # [seconds, len(POINTS)]
    fault_age: np.ndarray  # [seconds]: seconds since the fault started, -1 while healthy


def move_setpoints(plant: PlantModel, rng: np.random.Generator) -> None:
    """The operator: mostly nudges, sometimes a jump anywhere in the chiller's and drive's ranges."""
    low, high = CHILLER_SETPOINT_RANGE
    jump = rng.random() < 0.3
    setpoint = rng.uniform(low, high) if jump else plant.chiller_setpoint + rng.uniform(-1.0, 1.0)
    plant.chiller_setpoint = round(min(max(setpoint, low), high), 2)
    low_rpm, high_rpm = SPEED_SETPOINT_RANGE
    speed = rng.uniform(low_rpm, high_rpm) if jump else plant.pump_speed_setpoint + rng.uniform(-100, 100)
    plant.pump_speed_setpoint = int(min(max(speed, low_rpm), high_rpm))


def simulate(seed: int, seconds: int, *, fault: str | None = None, fault_at: float = math.inf,
             hold_s: tuple[float, float] = (60.0, 900.0)) -> Run:
    """Run the plant for ``seconds``, moving setpoints every ``hold_s`` and starting ``fault`` at ``fault_at``."""
    plant = PlantModel(seed)
    operator = np.random.default_rng([seed, 7])
    readings = np.empty((seconds, len(POINTS)))
    fault_age = np.full(seconds, -1.0)
    next_move = 0.0
    for i in range(seconds):
        if plant.elapsed >= next_move:
            move_setpoints(plant, operator)
            next_move = plant.elapsed + operator.uniform(*hold_s)
        if fault is not None and plant.fault is None and plant.elapsed >= fault_at:
            plant.fault, plant.fault_age = fault, 0.0
        plant.step(STEP_S)
        readings[i] = [plant.readings[name] for name in POINTS]
        fault_age[i] = plant.fault_age if plant.fault is not None else -1.0
    return Run(readings, fault_age)


def skewed(readings: np.ndarray, seed: int) -> np.ndarray:
    """Rows as the live twin holds them: each point's value up to ``MAX_SKEW_S`` older than the rest."""
    rng = np.random.default_rng([seed, 11])
    rows = np.arange(len(readings))[:, None] - rng.integers(0, MAX_SKEW_S + 1, size=readings.shape)
    return readings[np.maximum(rows, 0), np.arange(readings.shape[1])[None, :]]


def columns(rows: np.ndarray, names: Sequence[str]) -> np.ndarray:
    return rows[:, [COL[name] for name in names]]


def runs(role: str, count: int, seconds: int) -> list[Run]:
    return [simulate(SEEDS[role] + k, seconds) for k in range(count)]


def fault_runs(kind: str, plan: Plan) -> list[Run]:
    """Faulty runs: the fault starts between 10 and 20 minutes in (in quick mode: 5 to 10)."""
    out = []
    for k in range(plan.fault_runs):
        seed = SEEDS[kind] + k
        start = np.random.default_rng([seed, 13]).uniform(plan.fault_s / 3, plan.fault_s * 2 / 3)
        out.append(simulate(seed, plan.fault_s, fault=kind, fault_at=float(start)))
    return out


def anomaly_rows(run_list: list[Run], seed: int, warmup: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Skewed anomaly-model input rows of every run (after a warm-up), and each row's fault age."""
    rows = [skewed(r.readings, seed + k)[warmup:] for k, r in enumerate(run_list)]
    ages = [r.fault_age[warmup:] for r in run_list]
    return columns(np.concatenate(rows), ANOMALY_INPUTS), np.concatenate(ages)


def operate(plant: PlantModel, operator: np.random.Generator, seconds: int) -> None:
    """Run the plant ``seconds`` with the operator moving setpoints about every 5 minutes."""
    for _ in range(seconds):
        if operator.random() < 1 / 300:
            move_setpoints(plant, operator)
        plant.step(STEP_S)


def branch(plant: PlantModel, setpoint: float, speed: int) -> dict[str, float]:
    """A copy of the plant (same load and noise to come) run ``HORIZON_S`` at these setpoints."""
    copied = copy.deepcopy(plant)
    copied.chiller_setpoint, copied.pump_speed_setpoint = setpoint, speed
    for _ in range(HORIZON_S):
        copied.step(STEP_S)
    return copied.readings


def branch_rows(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Counterfactual training rows: from each state, several candidates run into the same future.

    The load 5 min ahead is unknowable and moves power by tens of kW, swamping the ~1.5 kW per degC
    a setpoint changes it; candidates that share a future make the setpoint's own effect visible.
    """
    xs, ys = [], []
    per_run = 40
    for k in range(math.ceil(plan.sim_states / per_run)):
        seed = SEEDS["branches"] + k
        plant, operator = PlantModel(seed), np.random.default_rng([seed, 7])
        move_setpoints(plant, operator)
        operate(plant, operator, 600)
        for _ in range(min(per_run, plan.sim_states - k * per_run)):
            state = plant.readings
            for _ in range(plan.sim_candidates):
                setpoint = round(float(operator.uniform(*CHILLER_SETPOINT_RANGE)), 2)
                speed = int(operator.integers(SPEED_SETPOINT_RANGE[0], SPEED_SETPOINT_RANGE[1] + 1))
                xs.append([state["chiller1.load"], state["chiller1.supply_temp"], setpoint, speed])
                ahead = branch(plant, setpoint, speed)
                ys.append([ahead[name] for name in SIM_OUTPUTS])
            operate(plant, operator, int(operator.integers(*BRANCH_EVERY_S)))
    return np.array(xs), np.array(ys)


def sim_rows(run_list: list[Run], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(state and candidate setpoints at t, readings at t + horizon) wherever the setpoints held."""
    xs, ys = [], []
    for k, run in enumerate(run_list):
        rows = skewed(run.readings, seed + k)
        decisions = columns(run.readings, SIM_DECISIONS)
        changed = np.any(decisions[1:] != decisions[:-1], axis=1)
        last_change = np.concatenate([[0], np.cumsum(changed)])  # a counter that moves at each change
        held = last_change[:-HORIZON_S] == last_change[HORIZON_S:]
        t = np.flatnonzero(held)
        xs.append(columns(rows, SIM_INPUTS)[t])
        ys.append(columns(run.readings, SIM_OUTPUTS)[t + HORIZON_S])
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Dense:
    """The fitted MLP as plain layers, with the input and output scaling folded into the weights."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]


def fit_mlp(x: np.ndarray, y: np.ndarray, max_iter: int) -> Dense:
    """Fit a tanh MLP on standardised data (one BLAS thread: same weights on any machine size)."""
    x_mean, x_std = x.mean(axis=0), x.std(axis=0)
    y_mean, y_std = y.mean(axis=0), y.std(axis=0)
    mlp = MLPRegressor(hidden_layer_sizes=HIDDEN, activation="tanh", solver="lbfgs", alpha=1e-4,
                       max_iter=max_iter, tol=1e-9, random_state=0)
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration cap is the budget, on purpose
        mlp.fit((x - x_mean) / x_std, (y - y_mean) / y_std)
    weights = [w.copy() for w in mlp.coefs_]
    biases = [b.copy() for b in mlp.intercepts_]
    biases[0] = biases[0] - (x_mean / x_std) @ weights[0]
    weights[0] = weights[0] / x_std[:, None]
    biases[-1] = biases[-1] * y_std + y_mean
    weights[-1] = weights[-1] * y_std[None, :]
    return Dense(weights, biases)


def predict(dense: Dense, x: np.ndarray) -> np.ndarray:
    h = x
    for i, (w, b) in enumerate(zip(dense.weights, dense.biases, strict=True)):
        h = h @ w + b
        if i < len(dense.weights) - 1:
            h = np.tanh(h)
    return h


def coverage(x: np.ndarray, names: Sequence[str], margin: float = 0.05) -> dict[str, list[float]]:
    """Plausible range per input: what training covered, widened by ``margin`` of the span."""
    low, high = x.min(axis=0), x.max(axis=0)
    pad = (high - low) * margin
    bounds = zip(names, low - pad, high + pad, strict=True)
    return {name: [math.floor(lo), math.ceil(hi)] for name, lo, hi in bounds}


# --------------------------------------------------------------------------- ONNX graphs


def _f32(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def mlp_nodes(dense: Dense, source: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Gemm (+ Tanh) per layer, reading ``source``; returns nodes, initializers and the last tensor."""
    nodes, inits, current = [], [], source
    for i, (w, b) in enumerate(zip(dense.weights, dense.biases, strict=True)):
        inits += [_f32(f"W{i}", w), _f32(f"B{i}", b)]
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"B{i}"], [f"gemm{i}"]))
        current = f"gemm{i}"
        if i < len(dense.weights) - 1:
            nodes.append(helper.make_node("Tanh", [current], [f"h{i}"]))
            current = f"h{i}"
    return nodes, inits, current


def make_model(name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], n_inputs: int,
               outputs: list[onnx.ValueInfoProto], metadata: dict[str, str], doc: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_inputs])
    graph = helper.make_graph(nodes, name, [x], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="edge-agent models/build.py", model_version=1, doc_string=doc)
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def anomaly_graph(dense: Dense, sigma: np.ndarray, metadata: dict[str, str]) -> onnx.ModelProto:
    """score = max_j |x[checked_j] - predicted_j| / sigma_j; the drivers feed the MLP.

    Column selection is folded into the weights (zero rows for inputs a layer ignores), so the
    graph is four Gemms, two Tanh, a Sub, an Abs and a ReduceMax on the raw [batch, 6] input.
    """
    n = len(ANOMALY_INPUTS)
    first = np.zeros((n, dense.weights[0].shape[1]))
    first[[ANOMALY_INPUTS.index(d) for d in ANOMALY_DRIVERS]] = dense.weights[0]
    scaled = Dense([first, *dense.weights[1:-1], dense.weights[-1] / sigma],
                   [*dense.biases[:-1], dense.biases[-1] / sigma])
    nodes, inits, predicted = mlp_nodes(scaled, "input")
    pick = np.zeros((n, len(ANOMALY_CHECKED)))
    for j, name in enumerate(ANOMALY_CHECKED):
        pick[ANOMALY_INPUTS.index(name), j] = 1.0 / sigma[j]
    inits += [_f32("pick", pick)]
    nodes += [helper.make_node("MatMul", ["input", "pick"], ["observed"]),
              helper.make_node("Sub", ["observed", predicted], ["residual_z"]),
              helper.make_node("Abs", ["residual_z"], ["abs_z"]),
              helper.make_node("ReduceMax", ["abs_z"], ["score"], axes=[1], keepdims=0)]
    outputs = [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
               helper.make_tensor_value_info("residual_z", TensorProto.FLOAT, ["batch", len(ANOMALY_CHECKED)])]
    doc = "chiller-health: largest standardised residual of return temperature, power and vibration"
    return make_model("chiller_health", nodes, inits, n, outputs, metadata, doc)


def sim_graph(dense: Dense, metadata: dict[str, str]) -> onnx.ModelProto:
    """The MLP, then one [batch] output per predicted point, named by the point."""
    nodes, inits, predicted = mlp_nodes(dense, "input")
    outputs = []
    for j, name in enumerate(SIM_OUTPUTS):
        inits.append(numpy_helper.from_array(np.array(j, dtype=np.int64), f"col{j}"))
        nodes.append(helper.make_node("Gather", [predicted, f"col{j}"], [name], axis=1))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch"]))
    doc = f"chiller-sim: plant state and candidate setpoints -> readings {HORIZON_S} s ahead"
    return make_model("chiller_sim", nodes, inits, len(SIM_INPUTS), outputs, metadata, doc)


def session(path: Path) -> ort.InferenceSession:
    """One thread, no spinning: how the agent runs models."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_model(sess: ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
    return list(sess.run(None, {"input": x.astype(np.float32)}))


# --------------------------------------------------------------------------- the two models


@dataclass(frozen=True)
class Data:
    """Every simulated run of a build, by role."""

    train: list[Run]
    calib: list[Run]
    test: list[Run]
    faults: dict[str, list[Run]]

    @classmethod
    def simulate(cls, plan: Plan) -> Data:
        return cls(train=runs("train", plan.train_runs, plan.train_s),
                   calib=runs("calib", plan.calib_runs, plan.heldout_s),
                   test=runs("test", plan.test_runs, plan.heldout_s),
                   faults={kind: fault_runs(kind, plan) for kind in ("vibration", "sensor_drift")})


def longest_streak(flags: np.ndarray) -> int:
    best = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


def build_anomaly(data: Data, plan: Plan, path: Path) -> dict[str, object]:
    """Fit, calibrate the threshold on held-out normal runs, write, and measure on other held-out runs."""
    x, _ = anomaly_rows(data.train, SEEDS["train"])
    drivers = [ANOMALY_INPUTS.index(n) for n in ANOMALY_DRIVERS]
    checked = [ANOMALY_INPUTS.index(n) for n in ANOMALY_CHECKED]
    dense = fit_mlp(x[::8][:, drivers], x[::8][:, checked], plan.max_iter)
    calib, _ = anomaly_rows(data.calib, SEEDS["calib"])
    sigma = (calib[:, checked] - predict(dense, calib[:, drivers])).std(axis=0)
    calib_score = np.abs((calib[:, checked] - predict(dense, calib[:, drivers])) / sigma).max(axis=1)
    threshold = math.ceil(float(np.quantile(calib_score, 0.999)) * 10) / 10
    ranges = {**coverage(x[:, [ANOMALY_INPUTS.index("chiller1.load"), ANOMALY_INPUTS.index("pump1.flow")]],
                         ["chiller1.load", "pump1.flow"]), **{k: list(v) for k, v in INSTRUMENT_RANGES.items()}}
    metadata = {
        "kind": "anomaly", "name": "chiller-health",
        "inputs": json.dumps(ANOMALY_INPUTS),
        "units": json.dumps({**{n: UNITS[n] for n in ANOMALY_INPUTS}, "score": "sigma", "residual_z": "sigma"}),
        "outputs": json.dumps(["score", "residual_z"]),
        "residuals": json.dumps(ANOMALY_CHECKED),
        "threshold": f"{threshold:.1f}",
        "score": "max over residuals of |reading - predicted| / held-out residual std; higher = more anomalous",
        "interval": "5s",
        "plausible_ranges": json.dumps({n: ranges[n] for n in ANOMALY_INPUTS}),
        "training_data": training_text(plan, len(x[::8])),
        "build_command": BUILD_COMMAND, "card": "chiller_anomaly.card.md",
    }
    onnx.save(anomaly_graph(dense, sigma, metadata), path)
    quality = anomaly_quality(session(path), data, threshold)
    quality["calibration_rows"] = len(calib)
    return {"threshold": threshold, "sigma": sigma.tolist(), "quality": quality, "ranges": ranges,
            "training_data": metadata["training_data"]}


def anomaly_quality(sess: ort.InferenceSession, data: Data, threshold: float) -> dict[str, object]:
    """False alarms on held-out normal runs; detection once a fault has developed (60 s in)."""
    normal, _ = anomaly_rows(data.test, SEEDS["test"])
    alarms = run_model(sess, normal)[0] > threshold
    streaks = [longest_streak(run_model(sess, anomaly_rows([r], SEEDS["test"] + k)[0])[0] > threshold)
               for k, r in enumerate(data.test)]
    quality: dict[str, object] = {"normal_rows": len(normal), "false_alarm_rate": float(alarms.mean()),
                                  "longest_false_alarm_streak": max(streaks)}
    for kind, run_list in data.faults.items():
        firsts, developed, before = [], [], []
        for k, run in enumerate(run_list):
            rows, age = anomaly_rows([run], SEEDS[kind] + k)
            above = run_model(sess, rows)[0] > threshold
            developed.append(above[age >= 60.0])
            before.append(above[age < 0])
            hits = age[above & (age >= 0)]
            firsts.append(float(hits.min()) if len(hits) else math.inf)
        quality[kind] = {"runs": len(run_list), "detection_rate": float(np.concatenate(developed).mean()),
                         "first_detection_s_median": float(np.median(firsts)),
                         "first_detection_s_max": float(max(firsts)),
                         "false_alarm_rate_before_fault": float(np.concatenate(before).mean())}
    return quality


def build_sim(data: Data, plan: Plan, path: Path) -> dict[str, object]:
    """Fit on every training moment whose setpoints then held for the horizon; measure on held-out runs."""
    x, y = branch_rows(plan)
    dense = fit_mlp(x, y, plan.max_iter)
    ranges = coverage(x, SIM_INPUTS)
    ranges["chiller1.setpoint"] = list(CHILLER_SETPOINT_RANGE)
    ranges["pump1.speed_setpoint"] = list(SPEED_SETPOINT_RANGE)
    metadata = {
        "kind": "simulation", "name": "chiller-sim",
        "inputs": json.dumps(SIM_INPUTS),
        "units": json.dumps({n: UNITS[n] for n in (*SIM_INPUTS, *SIM_OUTPUTS)}),
        "outputs": json.dumps(SIM_OUTPUTS),
        "decision_inputs": json.dumps(SIM_DECISIONS),
        "horizon": f"{HORIZON_S}s",
        "plausible_ranges": json.dumps(ranges),
        "training_data": sim_training_text(plan, len(x)),
        "build_command": BUILD_COMMAND, "card": "chiller_sim.card.md",
    }
    onnx.save(sim_graph(dense, metadata), path)
    sess = session(path)
    test_x, test_y = sim_rows(data.test, SEEDS["test"])
    predicted = np.stack(run_model(sess, test_x), axis=1)
    error = np.abs(predicted - test_y)
    quality = {"test_rows": len(test_x),
               "mae": {n: float(e) for n, e in zip(SIM_OUTPUTS, error.mean(axis=0), strict=True)},
               "p95_abs_error": {n: float(e) for n, e in zip(SIM_OUTPUTS, np.quantile(error, 0.95, axis=0),
                                                                  strict=True)},
               "power_mae_pct": float(100 * error[:, 0].mean() / test_y[:, 0].mean()),
               "setpoint_effect": setpoint_effect(sess, plan)}
    return {"quality": quality, "ranges": ranges, "training_data": metadata["training_data"]}


def setpoint_effect(sess: ort.InferenceSession, plan: Plan) -> dict[str, float]:
    """What the optimiser relies on: the power change between two candidate setpoints 1 degC apart.

    Each state is copied twice (same load and noise streams) and run 5 min at setpoint - 0.5 and
    + 0.5 degC, so the measured difference is the setpoint's effect alone.
    """
    actual, predicted = [], []
    for k in range(plan.effect_states):
        seed = SEEDS["effect"] + k
        plant, operator = PlantModel(seed), np.random.default_rng([seed, 7])
        operate(plant, operator, int(operator.uniform(600, 2400)))
        base = min(max(plant.chiller_setpoint, 4.5), 14.5)
        powers, rows = [], []
        for candidate in (base - 0.5, base + 0.5):
            powers.append(branch(plant, candidate, plant.pump_speed_setpoint)["chiller1.power"])
            rows.append([plant.readings["chiller1.load"], plant.readings["chiller1.supply_temp"], candidate,
                         plant.pump_speed_setpoint])
        actual.append(powers[1] - powers[0])
        power = run_model(sess, np.array(rows))[0]
        predicted.append(float(power[1] - power[0]))
    a, p = np.array(actual), np.array(predicted)
    return {"states": len(a), "actual_kw_per_degc_mean": float(a.mean()), "predicted_kw_per_degc_mean": float(p.mean()),
            "mae_kw": float(np.abs(a - p).mean()), "sign_agreement": float(np.mean(np.sign(a) == np.sign(p)))}


def training_text(plan: Plan, rows: int) -> str:
    return (f"edge_agent.demo.physics.PlantModel, headless, 1 s steps: {plan.train_runs} normal runs of "
            f"{plan.train_s} s "
            f"(seeds {SEEDS['train']}+), setpoints moved every 60-900 s (chiller 4-15 degC, pump "
            f"{SPEED_SETPOINT_RANGE[0]}-{SPEED_SETPOINT_RANGE[1]} rpm; 30 % jumps, else nudges), inputs skewed "
            f"up to {MAX_SKEW_S} s against each other; {rows} rows fitted")


def sim_training_text(plan: Plan, rows: int) -> str:
    return (f"edge_agent.demo.physics.PlantModel, headless, 1 s steps: {plan.sim_states} states of normal runs "
            f"(seeds {SEEDS['branches']}+, {BRANCH_EVERY_S[0]}-{BRANCH_EVERY_S[1]} s apart), each copied "
            f"{plan.sim_candidates} times with random candidate setpoints (chiller 4-15 degC, pump "
            f"{SPEED_SETPOINT_RANGE[0]}-{SPEED_SETPOINT_RANGE[1]} rpm) and run {HORIZON_S} s; {rows} rows fitted")


# --------------------------------------------------------------------------- latency and cards


def latency(path: Path, rows: np.ndarray, repeats: int) -> dict[str, float]:
    """Per ``sess.run`` on one thread: median wall time and mean CPU time, in microseconds."""
    sess = session(path)
    feed = {"input": rows.astype(np.float32)}
    for _ in range(min(repeats, 200)):
        sess.run(None, feed)
    walls = np.empty(repeats)
    cpu = time.process_time_ns()
    for i in range(repeats):
        start = time.perf_counter_ns()
        sess.run(None, feed)
        walls[i] = time.perf_counter_ns() - start
    cpu = time.process_time_ns() - cpu
    return {"rows": len(rows), "wall_us_median": float(np.median(walls)) / 1e3,
            "wall_us_p99": float(np.quantile(walls, 0.99)) / 1e3, "cpu_us_mean": cpu / repeats / 1e3}


def gather_latency(names: Sequence[str], repeats: int = 20000) -> float:
    """CPU microseconds to turn a dict of current values into the [1, n] float32 input row."""
    current = {name: 1.0 + i for i, name in enumerate(names)}
    cpu = time.process_time_ns()
    for _ in range(repeats):
        np.array([[current[name] for name in names]], dtype=np.float32)
    return (time.process_time_ns() - cpu) / repeats / 1e3


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or platform.system()}, Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}")


def fmt_ranges(ranges: dict[str, list[float]], names: Sequence[str]) -> dict[str, str]:
    return {n: f"{ranges[n][0]:g} .. {ranges[n][1]:g}" for n in names}


def anomaly_card(result: dict[str, object], timing: dict[str, object] | None) -> str:
    q = result["quality"]
    assert isinstance(q, dict)
    ranges = fmt_ranges(result["ranges"], ANOMALY_INPUTS)  # type: ignore[arg-type]
    role = {n: "driver (fed to the MLP)" if n in ANOMALY_DRIVERS else "checked (residual)" for n in ANOMALY_INPUTS}
    inputs = "\n".join(f"| {i} | `{n}` | {UNITS[n]} | {role[n]} | {ranges[n]} |" for i, n in enumerate(ANOMALY_INPUTS))
    sigma = ", ".join(f"`{n}` {s:.3g} {UNITS[n]}" for n, s in zip(ANOMALY_CHECKED, result["sigma"], strict=True))  # type: ignore[call-overload]
    faults = "\n".join(
        f"| {kind} | {f['runs']} | {100 * f['detection_rate']:.2f} % | {f['first_detection_s_median']:.0f} s / "
        f"{f['first_detection_s_max']:.0f} s | {100 * f['false_alarm_rate_before_fault']:.3f} % |"
        for kind, f in ((k, q[k]) for k in ("vibration", "sensor_drift")))
    return f"""# Model card: chiller-health (`chiller_anomaly.onnx`)

Anomaly model for chiller1 of the demo plant (`edge_agent/demo/physics.py`). Built by `{BUILD_COMMAND}`;
this card is written by the same build, numbers included.

## Contract
- Input `input`: float32 `[batch, {len(ANOMALY_INPUTS)}]`, columns in this order (metadata `inputs`):

| col | point | unit | role | plausible range (metadata `plausible_ranges`) |
|---|---|---|---|---|
{inputs}

- Output 0 `score`: float32 `[batch]`, higher = more anomalous, in sigmas: the largest of
  |reading - predicted| / sigma over the checked points. Output 1 `residual_z`: float32
  `[batch, {len(ANOMALY_CHECKED)}]`, the signed residuals in sigmas, columns `{'`, `'.join(ANOMALY_CHECKED)}`
  (metadata `residuals`): which reading disagrees, and in which direction.
- Threshold (metadata `threshold`): **{result['threshold']:.1f}**, the 99.9th percentile of the score on
  {q['calibration_rows']} rows of held-out normal runs (seeds {SEEDS['calib']}+), rounded up to 0.1.
- Suggested interval: 5 s (metadata `interval`).
- Plausible ranges: load and flow are the training coverage (outside it the model extrapolates); the
  other points get instrument ranges only, because a fault must still be scored, not skipped.

## How it works
A tanh MLP ({len(ANOMALY_DRIVERS)}-{HIDDEN[0]}-{HIDDEN[1]}-{len(ANOMALY_CHECKED)}) predicts what the checked points
should read given supply temperature, load and loop flow (the physics: return = supply + load / (1.163 flow);
power and vibration follow load and supply temperature). Residual sigmas (held-out normal runs): {sigma}.
A bearing fault shows in vibration; a drifting supply sensor breaks the return - supply = load / flow
balance (and the power a given supply temperature implies).

## Training data
{result['training_data']}. Normal operation only. Loads follow the plant's own profile
(about 150-480 kW: 20 min and 5 min swings plus AR(1) noise), including overload peaks above capacity.

## Measured quality (the written file run with onnxruntime on runs it never saw)
- False alarms on {q['normal_rows']} rows of held-out normal runs (seeds {SEEDS['test']}+, 1 row/s):
  **{100 * q['false_alarm_rate']:.3f} %** of rows above the threshold; longest streak of consecutive
  rows above it: {q['longest_false_alarm_streak']} (so raise-after-3 hysteresis would not have fired).
- Faulty runs (fault starts 10-20 min into a 30 min run; "developed" = 60 s or more after the start):

| fault | runs | detection rate, developed | first detection, median / max | false alarms before the fault |
|---|---|---|---|---|
{faults}

{latency_text(timing, ANOMALY_INPUTS, single_only=True)}
"""


def sim_card(result: dict[str, object], timing: dict[str, object] | None) -> str:
    q = result["quality"]
    assert isinstance(q, dict)
    ranges = fmt_ranges(result["ranges"], SIM_INPUTS)  # type: ignore[arg-type]
    role = {n: "candidate setpoint (decision)" if n in SIM_DECISIONS else "current state" for n in SIM_INPUTS}
    inputs = "\n".join(f"| {i} | `{n}` | {UNITS[n]} | {role[n]} | {ranges[n]} |" for i, n in enumerate(SIM_INPUTS))
    outputs = "\n".join(f"| `{n}` | {UNITS[n]} | `[batch]` | {q['mae'][n]:.3g} | {q['p95_abs_error'][n]:.3g} |"
                        for n in SIM_OUTPUTS)
    e = q["setpoint_effect"]
    return f"""# Model card: chiller-sim (`chiller_sim.onnx`)

Simulation (surrogate) model of the demo plant (`edge_agent/demo/physics.py`) for the setpoint optimiser.
Built by `{BUILD_COMMAND}`; this card is written by the same build, numbers included.

## Contract
- Input `input`: float32 `[batch, {len(SIM_INPUTS)}]`; one row per candidate, columns in this order (metadata
  `inputs`; the candidate columns are listed in metadata `decision_inputs`):

| col | point | unit | role | plausible range (metadata `plausible_ranges`) |
|---|---|---|---|---|
{inputs}

- Outputs (metadata `outputs`, same order), one float32 `[batch]` tensor each, named by the point: the
  reading predicted **{HORIZON_S} s ahead** (metadata `horizon` = "{HORIZON_S}s") if the candidate setpoints are
  written now and held:

| output | unit | shape | MAE (held-out) | 95th pct abs error |
|---|---|---|---|---|
{outputs}

- Ranges: load and supply temperature are the training coverage; the setpoints are the chiller's own
  clamp (4-15 degC) and the speeds trained on ({SPEED_SETPOINT_RANGE[0]}-{SPEED_SETPOINT_RANGE[1]} rpm).

## How it works
A tanh MLP ({len(SIM_INPUTS)}-{HIDDEN[0]}-{HIDDEN[1]}-{len(SIM_OUTPUTS)}) on the current load and supply temperature
and the candidate setpoints. The model does not know the future load: the load 5 min ahead is the main error
(the plant's load swings by tens of kW in 5 min), and it is shared by all candidates of one call, so it
shifts them together and hardly changes which candidate is best (see the setpoint effect below).

## Training data
{result['training_data']}. Inputs are the state's readings and the candidates; targets are the
(noisy) readings {HORIZON_S} s later. Counterfactual branches are used because the load 5 min ahead is
unknowable and moves power by tens of kW, swamping the ~1.5 kW per degC a setpoint changes it: candidates
that share one future make the setpoint's own effect visible to the fit.

Held-out rows below come from ordinarily operated runs instead: every second whose setpoints then held
for {HORIZON_S} s, inputs up to {MAX_SKEW_S} s skewed against each other as in the live twin.

## Measured quality (the written file run with onnxruntime on runs it never saw)
- {q['test_rows']} held-out rows (seeds {SEEDS['test']}+): chiller power MAE
  **{q['mae']['chiller1.power']:.2f} kW = {q['power_mae_pct']:.1f} % of mean power**; table above for all outputs.
- Setpoint effect, what the optimiser ranks candidates by: {e['states']} plant states (seeds {SEEDS['effect']}+) each
  copied and run {HORIZON_S} s at setpoint -0.5 and +0.5 degC (same load and noise): measured power change
  {e['actual_kw_per_degc_mean']:.2f} kW per +1 degC on average, predicted {e['predicted_kw_per_degc_mean']:.2f};
  MAE of the change {e['mae_kw']:.2f} kW; same sign in {100 * e['sign_agreement']:.0f} % of states.

{latency_text(timing, SIM_INPUTS, single_only=False)}
"""


def latency_text(timing: dict[str, object] | None, names: Sequence[str], *, single_only: bool) -> str:
    if timing is None:
        return "## Latency\nNot measured in this build (--no-latency or --quick)."
    one = timing["single"]
    assert isinstance(one, dict)
    text = (f"## Latency (onnxruntime, intra_op_num_threads=1, spinning off; {timing['machine']})\n"
            f"- One row: median {one['wall_us_median']:.1f} us wall, {one['cpu_us_mean']:.1f} us CPU per run "
            f"(p99 wall {one['wall_us_p99']:.1f} us).\n"
            f"- Building the [1, {len(names)}] float32 row from a dict of current values: "
            f"{timing['gather_cpu_us']:.1f} us CPU (the twin lookup itself is the agent's part).")
    if not single_only:
        batch = timing["batch"]
        assert isinstance(batch, dict)
        text += (f"\n- A batch of {batch['rows']} candidates: median {batch['wall_us_median']:.0f} us wall, "
                 f"{batch['cpu_us_mean']:.0f} us CPU per run.")
    return text + "\n- Measured by the build; these lines differ from machine to machine and run to run."


def measure(out: Path) -> dict[str, dict[str, object]]:
    anomaly_row = np.array([[7.0, 11.0, 70.0, 2.3, 320.0, 72.0]])
    sim_rows_ = np.tile(np.array([[320.0, 7.0, 8.0, 1450.0]]), (1000, 1))
    sim_rows_[:, 2] = np.linspace(5.0, 12.0, 1000)
    return {
        "anomaly": {"machine": machine(), "single": latency(out / "chiller_anomaly.onnx", anomaly_row, 20000),
                    "gather_cpu_us": gather_latency(ANOMALY_INPUTS)},
        "sim": {"machine": machine(), "single": latency(out / "chiller_sim.onnx", sim_rows_[:1], 20000),
                "batch": latency(out / "chiller_sim.onnx", sim_rows_, 2000),
                "gather_cpu_us": gather_latency(SIM_INPUTS)},
    }


def main(argv: list[str] | None = None) -> int:
    """Simulate, fit, write both models and their cards into ``--out``."""
    parser = argparse.ArgumentParser(prog="python models/build.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--quick", action="store_true", help="a fraction of the data, for tests (not for shipping)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = Data.simulate(plan)
    print(f"simulated {time.perf_counter() - started:.1f} s", flush=True)
    anomaly = build_anomaly(data, plan, args.out / "chiller_anomaly.onnx")
    sim = build_sim(data, plan, args.out / "chiller_sim.onnx")
    print(f"fitted {time.perf_counter() - started:.1f} s", flush=True)
    timing = None if args.quick or args.no_latency else measure(args.out)
    (args.out / "chiller_anomaly.card.md").write_text(anomaly_card(anomaly, timing["anomaly"] if timing else None))
    (args.out / "chiller_sim.card.md").write_text(sim_card(sim, timing["sim"] if timing else None))
    print(json.dumps({"anomaly": anomaly, "sim": sim, "latency": timing}, indent=1))
    print(f"built in {time.perf_counter() - started:.1f} s into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
