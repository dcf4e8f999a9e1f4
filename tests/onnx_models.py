"""Tiny ONNX models built in the tests, not by models/build.py: any file honouring the contract works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path, metadata: dict[str, str] | None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edge-agent-tests")
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def zscore_model(path: Path, mean: list[float], scale: list[float], *, inputs: list[str] | None = None,
                 threshold: float | None = None, dtype: int = TensorProto.FLOAT, window: int = 0) -> Path:
    """score = sum(((x - mean) / scale)^2) per row: an anomaly model with a known answer."""
    n = len(mean)
    np_type = np.float32 if dtype == TensorProto.FLOAT else np.float64
    shape: list[int | str] = ["batch", window, n] if window else ["batch", n]
    x = helper.make_tensor_value_info("x", dtype, shape)
    score = helper.make_tensor_value_info("score", dtype, ["batch"] if not window else ["batch", window])
    inits = [numpy_helper.from_array(np.array(mean, np_type), "mean"),
             numpy_helper.from_array(np.array(scale, np_type), "scale"),
             numpy_helper.from_array(np.ones(n, np_type), "ones")]
    nodes = [helper.make_node("Sub", ["x", "mean"], ["d"]), helper.make_node("Div", ["d", "scale"], ["z"]),
             helper.make_node("Mul", ["z", "z"], ["z2"]), helper.make_node("MatMul", ["z2", "ones"], ["s"])]
    if window:  # average over the window: [batch, window] -> [batch]
        inits.append(numpy_helper.from_array(np.full(window, 1.0 / window, np_type), "avg"))
        nodes.append(helper.make_node("MatMul", ["s", "avg"], ["score"]))
        score = helper.make_tensor_value_info("score", dtype, ["batch"])
    else:
        nodes.append(helper.make_node("Identity", ["s"], ["score"]))
    graph = helper.make_graph(nodes, "zscore", [x], [score], inits)
    meta: dict[str, str] = {"kind": "anomaly"}
    if inputs is not None:
        meta["inputs"] = json.dumps(inputs)
    if threshold is not None:
        meta["threshold"] = str(threshold)
    return _save(graph, path, meta)


def linear_model(path: Path, weights: list[list[float]], bias: list[float], *, inputs: list[str],
                 outputs: list[str]) -> Path:
    """y = x @ W + b: a simulation model with named outputs."""
    w = np.array(weights, np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w.shape[1]])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear", [x], [y], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(bias, np.float32), "b")])
    return _save(graph, path, {"kind": "simulation", "inputs": json.dumps(inputs), "outputs": json.dumps(outputs)})
