"""Setpoint optimisation with the on-device simulation model.

Every ``interval``: take the twin's current values, build a grid of candidate setpoints inside
the safety gate's envelope (each setpoint within ``max_step`` of its reported value and inside
``min..max``), evaluate all candidates in one batched onnxruntime call, drop those whose
predicted outputs break a constraint, and pick the one with the lowest objective (a weighted
sum of predicted outputs). The current setpoints are always a candidate, so "hold" wins unless
something predicts better by more than ``min_gain``.

Modes: ``off`` (nothing), ``advise`` (the recommendation is recorded and published as an event,
nothing is written; the default), ``auto`` (the recommendation goes to the safety gate as a
request from source "optimizer", watched for rollback). Each chosen prediction is kept and,
once its horizon has passed, compared with what the plant actually did: the mean absolute
error per output is a tracked metric (``Optimizer.errors``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drivers.base import GOOD, Reading
from edge_agent.config import AgentConfig, OptimizerSection
from edge_agent.config.table import parse_duration
from edge_agent.control.gate import SafetyGate
from edge_agent.control.inference import ModelRunner
from edge_agent.errors import ModelError

log = logging.getLogger(__name__)

MAX_CANDIDATES = 20_000  # a grid larger than this is thinned per setpoint


@dataclass
class Recommendation:
    """One optimisation step's outcome."""

    ts: float
    setpoints: dict[str, float]  # chosen values
    current: dict[str, float]  # reported values when it ran
    predicted: dict[str, float]  # model outputs for the chosen candidate
    objective: float
    hold_objective: float
    action: str  # "hold" | "advise" | "write" | "wait" (auto, but min_interval has not passed or an override holds)
    feasible: int  # candidates meeting every constraint
    results: list[str] = field(default_factory=list)  # the gate's verdicts in auto mode


@dataclass
class _Prediction:
    due: float
    outputs: dict[str, float]


class Optimizer:
    """Runs the optimisation loop for one configured simulation model."""

    def __init__(self, settings: OptimizerSection, config: AgentConfig, model: Callable[[], ModelRunner | None],
                 latest: Callable[[str], Reading | None], gate: SafetyGate,
                 record_event: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self.config = config
        self.model = model
        self.latest = latest
        self.gate = gate
        self.record_event = record_event
        self.mode = settings.mode
        self.last: Recommendation | None = None
        self.last_skip = ""
        self.steps = 0
        self.errors: dict[str, list[float]] = {}  # output -> [sum of |error|, count]
        self._pending: list[_Prediction] = []
        self._points = {p.name: p for _, p in config.points()}
        self._held_last: list[str] = []

    def set_mode(self, mode: str, *, reason: str = "") -> None:
        """off | advise | auto."""
        if mode not in ("off", "advise", "auto"):
            raise ValueError(f"unknown optimiser mode {mode!r}")
        if mode != self.mode:
            log.warning("optimiser: mode %s -> %s%s", self.mode, mode, f" ({reason})" if reason else "")
            self.record_event({"ts": time.time(), "source": "optimizer", "kind": "mode", "state": mode,
                               "message": f"mode {self.mode} -> {mode}{': ' + reason if reason else ''}"})
            self.mode = mode

    def mean_errors(self) -> dict[str, float]:
        """Mean absolute prediction error per output, over the predictions checked so far."""
        return {name: total / count for name, (total, count) in self.errors.items() if count}

    async def run(self) -> None:
        """Step every interval until cancelled."""
        while True:
            await asyncio.sleep(self.settings.interval)
            self._check_predictions()
            if self.mode == "off":
                continue
            try:
                await self.step()
            except ModelError as exc:
                self._skip(str(exc))

    def _skip(self, reason: str) -> None:
        if reason != self.last_skip:
            log.info("optimiser: not optimising: %s", reason)
        self.last_skip = reason

    # ------------------------------------------------------------------ one step

    async def step(self) -> Recommendation | None:
        """One optimisation: returns the recommendation, or None when it could not run."""
        runner = self.model()
        if runner is None or runner.model is None:
            self._skip(f'model "{self.settings.model}" is not loaded')
            return None
        inputs, outputs = runner.model.inputs, runner.model.outputs
        unknown = [n for n in (*self.settings.objective, *(c.name for c in self.settings.constraints))
                   if n not in outputs]
        if unknown:
            self._skip(f"objective/constraints name {unknown}, the model's outputs are {list(outputs)}")
            return None
        current, problem = self._current(inputs)
        if problem:
            self._skip(problem)
            return None
        grid = self._grid(current)
        batch = np.tile(np.array([current[name] for name in inputs], dtype=np.float32), (len(grid), 1))
        for j, name in enumerate(self.settings.setpoints):
            if name in inputs:
                batch[:, inputs.index(name)] = grid[:, j]
        predicted = await runner.predict(batch)
        objective = sum(weight * predicted[name] for name, weight in self.settings.objective.items())
        feasible = np.ones(len(grid), dtype=bool)
        for bound in self.settings.constraints:
            values = predicted[bound.name]
            if bound.min is not None:
                feasible &= values >= bound.min
            if bound.max is not None:
                feasible &= values <= bound.max
        self.last_skip = ""
        return await self._choose(grid, predicted, np.asarray(objective), feasible, current)

    def _current(self, inputs: tuple[str, ...]) -> tuple[dict[str, float], str]:
        current: dict[str, float] = {}
        for name in (*inputs, *self.settings.setpoints):
            reading = self.latest(name)
            if reading is None or reading.value is None or reading.quality != GOOD:
                return {}, f"{name} is {reading.quality if reading else 'missing'}"
            if time.time() - reading.ts > self.config.gate.max_input_age and name not in self.settings.setpoints:
                return {}, f"{name} is stale"
            current[name] = float(reading.value)
        return current, ""

    def _grid(self, current: dict[str, float]) -> np.ndarray:
        """Candidates inside the gate's envelope; row 0 is "hold" (the current setpoints)."""
        per = self.settings.candidates
        k = len(self.settings.setpoints)
        while per ** k > MAX_CANDIDATES and per > 2:
            per -= 1
        axes = []
        for name in self.settings.setpoints:
            point = self._points[name]
            assert point.min is not None and point.max is not None
            step = point.max_step if point.max_step is not None else point.max - point.min
            low, high = max(point.min, current[name] - step), min(point.max, current[name] + step)
            axes.append(np.linspace(low, high, per) if high > low else np.array([current[name]]))
        hold = [current[name] for name in self.settings.setpoints]
        rows = [hold, *(list(c) for c in itertools.product(*axes))]
        return np.array(rows, dtype=np.float64)

    async def _choose(self, grid: np.ndarray, predicted: dict[str, np.ndarray], objective: np.ndarray,
                      feasible: np.ndarray, current: dict[str, float]) -> Recommendation:
        hold = float(objective[0])
        candidates = np.where(feasible)[0]
        best = int(candidates[np.argmin(objective[candidates])]) if len(candidates) else 0
        gain = hold - float(objective[best])
        if best != 0 and gain <= self.settings.min_gain:
            best = 0
        chosen = {name: float(grid[best, j]) for j, name in enumerate(self.settings.setpoints)}
        changed = any(abs(chosen[n] - current[n]) > 1e-9 for n in chosen)
        action = "hold" if not changed else ("write" if self.mode == "auto" else "advise")
        if action == "write" and (self._too_soon(chosen, current) or self._held(chosen, current)):
            action = "wait"  # the gate would refuse it: min_interval has not passed, or an operator override holds
        rec = Recommendation(time.time(), chosen, {n: current[n] for n in chosen},
                             {name: float(values[best]) for name, values in predicted.items()},
                             float(objective[best]), hold, action, int(feasible.sum()))
        self.steps += 1
        self.last = rec
        self._track(rec)
        self.record_event({"ts": rec.ts, "source": "optimizer", "kind": "recommendation", "state": action,
                           "message": _describe(rec), "setpoints": rec.setpoints, "predicted": rec.predicted,
                           "objective": rec.objective, "hold_objective": rec.hold_objective})
        if action == "write":
            runner = self.model()
            inputs = runner.model.inputs if runner and runner.model else ()
            for name, value in chosen.items():
                if abs(value - current[name]) > 1e-9:
                    result = await self.gate.request(name, value, source="optimizer", inputs=inputs, watch=True)
                    rec.results.append(f"{name}: {result.result} {result.reason}".strip())
        return rec

    def _too_soon(self, chosen: dict[str, float], current: dict[str, float]) -> bool:
        now = time.time()
        for name, value in chosen.items():
            if abs(value - current[name]) > 1e-9:
                since = now - self.gate.last_write.get(name, float("-inf"))
                if since < self._points[name].min_interval:
                    return True
        return False

    def _held(self, chosen: dict[str, float], current: dict[str, float]) -> bool:
        held = [name for name, value in chosen.items()
                if abs(value - current[name]) > 1e-9 and self.gate.held(name) is not None]
        if held and held != self._held_last:
            log.info("optimiser: not writing %s: held after an operator override at the device", ", ".join(held))
        self._held_last = held
        return bool(held)

    # ------------------------------------------------------------------ prediction error

    def _horizon(self) -> float:
        if self.settings.horizon is not None:
            return self.settings.horizon
        runner = self.model()
        text = runner.model.metadata.get("horizon", "") if runner and runner.model else ""
        try:
            return parse_duration(text) if text else 300.0
        except ValueError:
            return 300.0

    def _track(self, rec: Recommendation) -> None:
        self._pending.append(_Prediction(rec.ts + self._horizon(), dict(rec.predicted)))
        del self._pending[:-1000]

    def _check_predictions(self) -> None:
        now = time.time()
        due = [p for p in self._pending if p.due <= now]
        self._pending = [p for p in self._pending if p.due > now]
        for prediction in due:
            for name, value in prediction.outputs.items():
                reading = self.latest(name)
                if reading is None or reading.quality != GOOD or not isinstance(reading.value, (int, float)):
                    continue
                total = self.errors.setdefault(name, [0.0, 0])
                total[0] += abs(float(reading.value) - value)
                total[1] += 1


def _describe(rec: Recommendation) -> str:
    moves = ", ".join(f"{n} {rec.current[n]:g} -> {v:g}" for n, v in rec.setpoints.items())
    return (f"{rec.action}: {moves}; predicted objective {rec.objective:.3g} vs {rec.hold_objective:.3g} "
            f"holding ({rec.feasible} feasible candidates)")
