"""Model cost: one anomaly evaluation through the agent's own path, and RSS with both models loaded.

    .venv/bin/python bench/bench_models.py [--evaluations 2000]

Runs the shipped models with the agent's ModelRunner: inputs gathered from the current values,
the data-quality gate, onnxruntime in a worker thread, the derived score point and hysteresis.
Prints CPU per evaluation (process CPU: every thread) and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.base import Reading  # noqa: E402
from edge_agent.config import ModelConfig  # noqa: E402
from edge_agent.control.inference import ModelRunner, load  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=2000)
    args = parser.parse_args()
    before = rss_mb()
    health = ModelConfig(name="chiller-health", kind="anomaly", file=ROOT / "models" / "chiller_anomaly.onnx")
    sim = ModelConfig(name="chiller-sim", kind="simulation", file=ROOT / "models" / "chiller_sim.onnx")
    loaded = load(health)
    load(sim)
    after_load = rss_mb()
    values = json.loads(loaded.metadata.get("plausible_ranges", "{}"))
    now = time.time()
    latest = {name: Reading(name, sum(values.get(name, [0.0, 0.0])) / 2, "good", now) for name in loaded.inputs}
    runner = ModelRunner(health, latest.get, lambda r: None, lambda e: None, "chiller1")
    runner.model = loaded
    for _ in range(50):  # warm-up
        await runner.evaluate()
    started_cpu, started = time.process_time(), time.perf_counter()
    for _ in range(args.evaluations):
        for name, r in latest.items():
            latest[name] = r._replace(ts=time.time())
        await runner.evaluate()
    cpu = (time.process_time() - started_cpu) / args.evaluations * 1e6
    wall = (time.perf_counter() - started) / args.evaluations * 1e6
    print(f"command: {' '.join(sys.argv)}")
    print(f"anomaly evaluation (gather + gate + onnxruntime in a worker thread + score + hysteresis): "
          f"{cpu:.0f} us CPU, {wall:.0f} us wall   (target <= 200 us CPU)")
    print(f"peak RSS: {before:.1f} MB before, {after_load:.1f} MB with both models loaded, {rss_mb():.1f} MB after "
          f"{args.evaluations} evaluations   (target <= 100 MB for the agent with both models)")


if __name__ == "__main__":
    asyncio.run(main())
