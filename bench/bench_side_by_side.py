"""Benchmark: two source trees' agents side by side on one plant shape, for a small difference.

``bench_plant.py`` runs one agent at a time; on a shared, noisy machine the same row moves by
10-20 % between runs, which hides a change of a few percent. This runs this checkout's agent and
another source tree's (``--other``: a git worktree of another commit, using this checkout's venv)
at the same time, pinned to the same core, each with its own Modbus server (on the other core)
and both publishing to one local TLS mosquitto, so whatever the machine does it does to both.
Agent CPU (all threads, from /proc) is read over the same windows and divided by the points
offered in them (nothing counts delivery here: use ``bench_plant.py`` for that). Two agents on one
core are not quite alike (the second to start reads a few percent higher in an A/A run), so it
runs both orders, this tree first and then the other first, and prints the geometric mean of the
two ratios. Not a pass/fail test.

Run ``python bench/bench_side_by_side.py --other /tmp/wt-old --shape 10x100@100ms:v2:inflight``
(make the worktree with ``git worktree add /tmp/wt-old <commit>``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_plant as bp
from common import process_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True, help="the other source tree (a git worktree)")
    parser.add_argument("--shape", default="10x100@100ms:v2:inflight", help="as bench_plant.py --shape")
    parser.add_argument("--windows", type=int, default=5, help="measuring windows per order (5)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per window (20)")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before the first window (8)")
    return parser.parse_args(argv)


def cpu_seconds(agent: subprocess.Popen[bytes]) -> float:
    return process_cpu_seconds(agent.pid) or 0.0


def one_order(
    trees: list[Path], shape: bp.Shape, args: argparse.Namespace, pki: object, broker_port: int, work: Path
) -> list[tuple[float, float]]:
    """Both agents at once; (us per offered point of trees[0], of trees[1]) per window."""
    agents: list[subprocess.Popen[bytes]] = []
    servers = []
    logs = []
    try:
        for index, tree in enumerate(trees):
            data = work / f"data-{time.monotonic_ns()}-{index}"
            data.mkdir()
            server, ports = bp.start_server(shape, work)
            servers.append(server)
            version = bp.Version("this", sys.executable, True)
            text = bp.config_text(shape, version, data, ports, broker_port if shape.mqtt else None, pki)
            # two gateways on one broker: their own client ids and topics
            (data / "agent.toml").write_text(text.replace(f'id = "{bp.GATEWAY}"', f'id = "{bp.GATEWAY}-{index}"'))
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env["PYTHONPATH"] = str(tree)
            log = open(data / "agent.log", "w")  # noqa: SIM115 - closed after the agent exits
            logs.append(log)
            agents.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(data / "agent.toml")],
                    cwd=work,
                    env=env,
                    stderr=log,
                    preexec_fn=lambda: bp.pin(bp.AGENT_CPU),
                )
            )
        time.sleep(args.warmup)  # a warm-up, not a wait for a condition
        for agent, tree in zip(agents, trees, strict=True):
            if agent.poll() is not None:
                raise SystemExit(f"the agent of {tree} exited with {agent.returncode}")
        figures = []
        for _ in range(args.windows):
            before, began = [cpu_seconds(a) for a in agents], time.monotonic()
            time.sleep(args.seconds)
            after, ended = [cpu_seconds(a) for a in agents], time.monotonic()
            points = shape.offered * (ended - began)
            us = [(b - a) / points * 1e6 for a, b in zip(before, after, strict=True)]
            print(f"  {trees[0].name}: {us[0]:.2f}  {trees[1].name}: {us[1]:.2f} us per offered point", flush=True)
            figures.append((us[0], us[1]))
        return figures
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        for log in logs:
            log.close()
        for server in servers:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = bp.Shape.parse(args.shape)
    this, other = ROOT, args.other.resolve()
    from tests.mqtt_broker import Broker, make_pki

    with tempfile.TemporaryDirectory(prefix="bench-side-") as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        bp.pin(bp.OTHERS_CPU)
        with Broker(pki, work / "broker") as broker:
            print(f"{shape.text}: {this} first", flush=True)
            first = one_order([this, other], shape, args, pki, broker.port, work)
            print(f"{shape.text}: {other} first", flush=True)
            second = [(b, a) for a, b in one_order([other, this], shape, args, pki, broker.port, work)]
    ratios = []
    for label, figures in (("this first", first), ("other first", second)):
        mine, theirs = statistics.median(f[0] for f in figures), statistics.median(f[1] for f in figures)
        ratios.append(theirs / mine)
        print(
            f"{label:12s} this {mine:.2f} us, other {theirs:.2f} us per offered point: other / this {theirs / mine:.3f}"
        )
    print(
        f"other / this, both orders (geometric mean): {math.sqrt(ratios[0] * ratios[1]):.3f} "
        "(above 1: this checkout takes less CPU)"
    )


if __name__ == "__main__":
    main()
