"""ONNX models on the twin's live data: contract checks, the data-quality gate, scoring, hot swap.

A model file is self-describing through its ONNX ``metadata_props`` (see models/README.md):
``inputs`` (JSON list of point names), ``outputs`` (JSON list, simulation models), ``threshold``
(anomaly models), ``plausible`` (JSON object point -> [min, max]). The config may name them
instead; when both do, they must agree.

Contract. One float32 input of shape [batch, n_inputs] (or [batch, window, n_inputs] when
``window`` is set); an anomaly model's first output is one score per row, higher meaning more
anomalous; a simulation model's first output is [batch, n_outputs].

Windowed models (``window = N``) get the last N trusted input rows, one per interval, as
[1, N, n_inputs]; an untrusted row empties the window.

Data quality gate. A model scores only when every input is good, fresh (younger than
``max_input_age``), a finite number (a string, NaN or infinity never reaches a model) and inside
its plausible range; otherwise the evaluation is skipped and the reason counted
(``ModelRunner.skips``), so stale or wrong data never drives a decision. A score that comes out
non-finite is discarded the same way. Skips never count as clean scores: an active anomaly is
cleared only by ``clear_after`` clean scores in a row, with no skip between them. Nothing a value
can do ends a model's task: an evaluation that fails is logged, counted and retried next interval.

Sessions use ``intra_op_num_threads`` from the config (1 by default) with spinning off, and run
in a worker thread so the event loop never waits on a model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from drivers.base import GOOD, Reading, source_age
from edge_agent.config import ModelConfig
from edge_agent.errors import ModelError

log = logging.getLogger(__name__)

# onnxruntime raises its own exception classes (Fail, InvalidProtobuf, InvalidArgument, ...),
# not all of them RuntimeErrors; they live in the C extension's module.
_ORT_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, *(
    value for value in vars(ort.capi.onnxruntime_pybind11_state).values()
    if isinstance(value, type) and issubclass(value, Exception)))
_LOAD_ERRORS: tuple[type[BaseException], ...] = (*_ORT_ERRORS, OSError)
# what an evaluation may raise on a value nobody foresaw; the model's task logs it and goes on
_EVALUATION_ERRORS: tuple[type[BaseException], ...] = (*_ORT_ERRORS, ValueError, TypeError, ArithmeticError)

_FLOAT32_MAX = float(np.finfo(np.float32).max)

Latest = Callable[[str], Reading | None]
Submit = Callable[[Sequence[Reading]], None]
OnEvent = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class LoadedModel:
    """An onnxruntime session whose contract matched the config."""

    session: ort.InferenceSession
    input_name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    threshold: float | None
    plausible: dict[str, tuple[float, float]]
    metadata: dict[str, str]
    source: str  # file path or "update <sha256>"

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """One batched evaluation (blocking: call from a worker thread)."""
        result: list[np.ndarray] = self.session.run(None, {self.input_name: batch})
        return result


def _session(cfg: ModelConfig, model: bytes | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg.threads
    options.inter_op_num_threads = 1
    # Spinning threads burn a gateway's CPU between evaluations for a few microseconds of latency.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except _LOAD_ERRORS as exc:
        raise ModelError(f'model "{cfg.name}": cannot load {model if isinstance(model, Path) else "the update"}: '
                         f"{str(exc).splitlines()[0]}") from exc


def _meta_list(meta: dict[str, str], key: str, model: str) -> tuple[str, ...]:
    if key not in meta:
        return ()
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ModelError(f'model "{model}": metadata "{key}" is not a JSON list: {exc}') from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelError(f'model "{model}": metadata "{key}" must be a JSON list of names')
    return tuple(value)


def _names(cfg: ModelConfig, meta: dict[str, str], key: str, configured: tuple[str, ...]) -> tuple[str, ...]:
    from_file = _meta_list(meta, key, cfg.name)
    if configured and from_file and configured != from_file:
        raise ModelError(f'model "{cfg.name}": config {key} {list(configured)} differ from the file\'s '
                         f"metadata {list(from_file)}")
    return configured or from_file


def _dim(shape: Sequence[Any], index: int) -> int | None:
    value = shape[index] if len(shape) > index else None
    return value if isinstance(value, int) else None


def check_contract(cfg: ModelConfig, session: ort.InferenceSession, source: str,
                   known: Collection[str] | None = None) -> LoadedModel:
    """Compare the session's inputs and outputs with the config and metadata; ModelError on mismatch.

    ``known``: the point names the gateway has; every input must be one of them.
    """
    meta = dict(session.get_modelmeta().custom_metadata_map)
    inputs = _names(cfg, meta, "inputs", cfg.inputs)
    if not inputs:
        raise ModelError(f'model "{cfg.name}": no inputs: set inputs = [...] in the config or "inputs" in '
                         "the file's metadata")
    unknown = [name for name in inputs if known is not None and name not in known]
    if unknown:
        raise ModelError(f'model "{cfg.name}": its inputs {unknown} are not configured points')
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != 1:
        raise ModelError(f'model "{cfg.name}": expected one input tensor, the file has {len(graph_inputs)}')
    tensor = graph_inputs[0]
    if tensor.type != "tensor(float)":
        raise ModelError(f'model "{cfg.name}": expected a float32 input, the file\'s "{tensor.name}" is {tensor.type}')
    rank = 3 if cfg.window else 2
    if len(tensor.shape) != rank:
        want = "[batch, window, n_inputs]" if cfg.window else "[batch, n_inputs]"
        raise ModelError(f'model "{cfg.name}": expected input shape {want}, the file has {tensor.shape}')
    width = _dim(tensor.shape, rank - 1)
    if width is not None and width != len(inputs):
        raise ModelError(f'model "{cfg.name}": the file takes {width} inputs, the config names {len(inputs)}')
    if cfg.window and _dim(tensor.shape, 1) not in (None, cfg.window):
        raise ModelError(f'model "{cfg.name}": window = {cfg.window}, the file expects {tensor.shape[1]}')
    outputs = _names(cfg, meta, "outputs", cfg.outputs) if cfg.kind == "simulation" else ()
    if cfg.kind == "simulation" and not outputs:
        raise ModelError(f'model "{cfg.name}": a simulation model needs output names (config outputs or metadata)')
    threshold = cfg.threshold
    if cfg.kind == "anomaly" and threshold is None:
        try:
            threshold = float(meta["threshold"])
        except (KeyError, ValueError):
            raise ModelError(f'model "{cfg.name}": no threshold in the config or the file\'s metadata') from None
    plausible = dict(_plausible(meta, cfg.name))
    plausible.update(cfg.plausible)
    loaded = LoadedModel(session, tensor.name, inputs, outputs, threshold, plausible, meta, source)
    _smoke_test(cfg, loaded)
    return loaded


def _plausible(meta: dict[str, str], model: str) -> dict[str, tuple[float, float]]:
    key = next((k for k in ("plausible", "plausible_ranges") if k in meta), None)
    if key is None:
        return {}
    try:
        raw = json.loads(meta[key])
        return {str(k): (float(v[0]), float(v[1])) for k, v in raw.items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError, IndexError) as exc:
        raise ModelError(f'model "{model}": metadata "{key}" must map names to [min, max]: {exc}') from exc


def _smoke_test(cfg: ModelConfig, model: LoadedModel) -> None:
    """Run two rows of typical values (mid-range when plausible ranges are known) and check the outputs."""
    width = len(model.inputs)
    mid = np.array([sum(model.plausible.get(n, (0.0, 0.0))) / 2 for n in model.inputs], dtype=np.float32)
    shape = (2, cfg.window, width) if cfg.window else (2, width)
    batch = np.broadcast_to(mid, shape).astype(np.float32)
    try:
        outputs = model.run(batch)
    except _ORT_ERRORS as exc:
        raise ModelError(f'model "{cfg.name}": fails on a test input: {str(exc).splitlines()[0]}') from exc
    first = np.asarray(outputs[0])
    if cfg.kind == "anomaly":
        if first.size != 2:
            raise ModelError(f'model "{cfg.name}": the first output must be one score per row, got shape '
                             f"{list(first.shape)} for 2 rows")
    else:
        try:
            first = columns(outputs, len(model.outputs), 2)
        except ValueError as exc:
            raise ModelError(f'model "{cfg.name}": {exc} ({", ".join(model.outputs)})') from None
    if not np.all(np.isfinite(first)):
        raise ModelError(f'model "{cfg.name}": gives non-finite outputs on a test input')


def columns(outputs: Sequence[np.ndarray], count: int, rows: int) -> np.ndarray:
    """A simulation model's predictions as [rows, count]: from one [batch, count] output, or from
    ``count`` outputs of [batch] (or [batch, 1]) each, in the order of the output names."""
    first = np.asarray(outputs[0])
    if first.shape == (rows, count):
        return first
    if len(outputs) >= count and all(np.asarray(o).reshape(-1).shape == (rows,) for o in outputs[:count]):
        return np.stack([np.asarray(o).reshape(-1) for o in outputs[:count]], axis=1)
    shapes = [list(np.asarray(o).shape) for o in outputs]
    raise ValueError(f"expected one [batch, {count}] output or {count} outputs of [batch], got {shapes}")


def load(cfg: ModelConfig, model: bytes | Path | None = None, source: str | None = None,
         known: Collection[str] | None = None) -> LoadedModel:
    """Load and check a model (blocking; call from a worker thread)."""
    path_or_bytes = cfg.file if model is None else model
    session = _session(cfg, path_or_bytes)
    return check_contract(cfg, session, source or str(cfg.file), known)


def _finite(value: object) -> float | None:
    """A model input as a float: numbers and booleans (0/1) that are finite; None for anything else."""
    if isinstance(value, bool | int | float):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


@dataclass
class Hysteresis:
    """Raise after N consecutive scores above the threshold, clear after M below."""

    raise_after: int
    clear_after: int
    active: bool = False
    above: int = 0
    below: int = 0

    def interrupted(self) -> None:
        """An evaluation was skipped (untrusted data): clean scores must start counting again."""
        self.below = 0

    def update(self, over: bool) -> str | None:
        """Feed one score; returns "raised" or "cleared" when the state flips."""
        if over:
            self.above, self.below = self.above + 1, 0
            if not self.active and self.above >= self.raise_after:
                self.active = True
                return "raised"
        else:
            self.below, self.above = self.below + 1, 0
            if self.active and self.below >= self.clear_after:
                self.active = False
                return "cleared"
        return None


@dataclass
class ModelStatus:
    """What `status` and the summary show about a model."""

    state: str = "loading"  # loading | ready | failed
    last_score: float | None = None
    last_ts: float | None = None
    evaluations: int = 0
    skips: Counter[str] = field(default_factory=Counter)
    last_skip: str = ""
    last_error: str = ""
    cpu_us: float = 0.0  # CPU of the last evaluation, inputs gathered included


class ModelRunner:
    """Runs one configured model for as long as the agent runs; swaps in new versions on request."""

    def __init__(self, cfg: ModelConfig, latest: Latest, submit: Submit, on_event: OnEvent,
                 equipment: str | None, known: Collection[str] | None = None,
                 age: Callable[[str, Reading], float] | None = None) -> None:
        self.cfg = cfg
        self.known = known
        self.age = age or source_age
        self.latest = latest
        self.submit = submit
        self.on_event = on_event
        self.equipment = equipment
        self.model: LoadedModel | None = None
        self.status = ModelStatus()
        self.hysteresis = Hysteresis(cfg.raise_after, cfg.clear_after)
        # windowed models: the last `window` trusted input rows, one per interval
        self.rows: deque[np.ndarray] = deque(maxlen=max(1, cfg.window))

    @property
    def anomaly_active(self) -> bool:
        return self.hysteresis.active

    async def run(self) -> None:
        """Load, then (anomaly models) score every interval; only cancellation ends it."""
        try:
            self.model = await asyncio.to_thread(load, self.cfg, None, None, self.known)
            self.status.state = "ready"
            if self.equipment is None and isinstance(self.known, Mapping):
                # inputs named by the file, not the config: the equipment is its first input's device
                self.equipment = self.known.get(self.model.inputs[0])
            log.info('model "%s" loaded from %s: inputs %s', self.cfg.name, self.model.source,
                     ", ".join(self.model.inputs))
        except ModelError as exc:
            self.status.state, self.status.last_error = "failed", str(exc)
            log.error("%s; the rest of the agent keeps running", exc)
        if self.cfg.kind != "anomaly":
            return
        while True:
            await asyncio.sleep(self.cfg.interval)
            if self.model is None:
                continue
            try:
                await self.evaluate()
            except _EVALUATION_ERRORS as exc:
                # a value the checks did not foresee must not end the model's task
                self._skip(f"evaluation failed: {exc!r}")

    def gather(self, model: LoadedModel, now: float) -> np.ndarray | str:
        """The input row from the twin's current values, or the reason it cannot be trusted."""
        row = np.empty(len(model.inputs), dtype=np.float32)
        for i, name in enumerate(model.inputs):
            reading = self.latest(name)
            if reading is None or reading.value is None:
                return f"{name} has no value yet"
            if reading.quality != GOOD:
                return f"{name} is {reading.quality}"
            age = self.age(name, reading)
            if age > self.cfg.max_input_age:
                return f"{name} is {age:.0f} s old"
            value = _finite(reading.value)
            if value is None:
                return f"{name} = {reading.value!r} is not a finite number"
            if abs(value) > _FLOAT32_MAX:  # the model takes float32: this would become infinite
                return f"{name} = {value:g} is beyond float32's range"
            span = model.plausible.get(name)
            if span is not None and not span[0] <= value <= span[1]:
                return f"{name} = {value:g} is outside its plausible range {span[0]:g}..{span[1]:g}"
            row[i] = value
        return row[np.newaxis, :]

    async def evaluate(self) -> float | None:
        """One evaluation: gate, score, derived point, hysteresis event. Returns the score or None."""
        model = self.model
        if model is None:
            return None
        started = time.process_time()
        now = time.time()
        batch = self.gather(model, now)
        if isinstance(batch, str):
            self._skip(batch)
            return None
        if self.status.last_skip:
            log.info('model "%s": inputs trusted again, scoring', self.cfg.name)
            self.status.last_skip = ""
        if self.cfg.window:
            self.rows.append(batch[0])
            if len(self.rows) < self.cfg.window:
                self.status.skips["filling its window"] += 1
                return None
            batch = np.stack(self.rows)[np.newaxis, :, :]
        outputs = await asyncio.to_thread(model.run, batch)
        score = float(np.asarray(outputs[0]).reshape(-1)[0])
        if not math.isfinite(score):
            self._skip(f"the model gave a non-finite score ({score})")
            return None
        self.status.cpu_us = (time.process_time() - started) * 1e6
        self.status.evaluations += 1
        self.status.last_score, self.status.last_ts = score, now
        self.submit([Reading(self.cfg.score_point, score, GOOD, now)])
        assert model.threshold is not None
        change = self.hysteresis.update(score > model.threshold)
        if change is not None:
            self._event(change, score, model.threshold, now)
        return score

    def _skip(self, reason: str) -> None:
        """Count a skipped evaluation; it interrupts a run of clean scores and empties the window."""
        self.rows.clear()  # a window must be made of consecutive trusted rows
        self.hysteresis.interrupted()
        self.status.skips[reason.split(" ", 1)[1] if " " in reason else reason] += 1
        if reason != self.status.last_skip:
            log.info('model "%s": not scoring: %s', self.cfg.name, reason)
        self.status.last_skip = reason

    def _event(self, state: str, score: float, threshold: float, now: float) -> None:
        level = logging.WARNING if state == "raised" else logging.INFO
        log.log(level, 'model "%s": anomaly %s (score %.3g, threshold %.3g)', self.cfg.name, state, score, threshold)
        self.on_event({"ts": now, "source": self.cfg.name, "kind": "anomaly", "state": state, "score": score,
                       "equipment": self.equipment,
                       "message": f"{self.cfg.name}: score {score:.3g} {'above' if state == 'raised' else 'back under'}"
                                  f" threshold {threshold:.3g}"})

    async def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Simulation models: one batched evaluation, outputs by name."""
        model = self.model
        if model is None:
            raise ModelError(f'model "{self.cfg.name}" is not loaded: {self.status.last_error or "loading"}')
        outputs = await asyncio.to_thread(model.run, batch.astype(np.float32, copy=False))
        table = columns(outputs, len(model.outputs), batch.shape[0])
        return {name: table[:, i] for i, name in enumerate(model.outputs)}

    async def swap(self, model: bytes | Path, source: str) -> LoadedModel:
        """Load and check a new version; replace the running one only if it passes (ModelError otherwise)."""
        try:
            loaded = await asyncio.to_thread(load, self.cfg, model, source, self.known)
        except ModelError as exc:
            log.error("%s; keeping the running version (%s)", exc,
                      self.model.source if self.model else "none loaded")
            raise
        self.model = loaded
        self.status.state, self.status.last_error = "ready", ""
        log.info('model "%s": swapped in %s', self.cfg.name, source)
        return loaded
