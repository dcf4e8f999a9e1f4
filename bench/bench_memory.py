"""The whole agent's memory with both shipped models: the demo config against the demo plant.

    .venv/bin/python bench/bench_memory.py [--seconds 30] [--repeat 2] [--checkout DIR ...]

Starts the demo plant (``python -m edge_agent.demo.plant``: a chiller on OPC UA, a pump on Modbus
TCP) on free ports, writes the demo config for it (``edge_agent.demo.runner.demo_config``: both
models, the web page on a free port), runs ``edge-agent run`` in its own process and reads
``/proc/PID/status`` after ``--seconds``: VmRSS, VmHWM (the peak), RssAnon (the heap) and
RssFile (library pages). Twice per repeat: on a fresh data folder (the twin's migrations run),
then again on that twin (what every later start of a gateway sees). ``--checkout`` measures other
source trees with the same interpreter (a ``git worktree`` of another commit: an A/B in one run,
rows alternating). Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import free_port  # noqa: E402

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status_mb(pid: int) -> dict[str, float]:
    """The memory lines of /proc/PID/status, in MiB."""
    figures: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in FIELDS:
                figures[key] = int(value.split()[0]) / 1024
    return figures


def wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the demo plant did not open port {port}")


def measure(checkout: Path, config: Path, seconds: float, log: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with open(log, "ab") as out:
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                                 cwd=config.parent, env=env, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if agent.poll() is not None:
                    raise SystemExit(f"the agent exited with {agent.returncode}; see {log}")
                time.sleep(0.5)
            return status_mb(agent.pid)
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="run time before reading the figures")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--checkout", type=Path, action="append", default=[],
                        help="another source tree to measure too (this checkout is always measured)")
    args = parser.parse_args()
    from edge_agent.demo.runner import demo_config

    checkouts = [ROOT, *(path.resolve() for path in args.checkout)]
    print(f"python {sys.version.split()[0]}, {args.seconds:g} s per run; MiB")
    print(f"{'checkout':<40} {'start':<8} " + " ".join(f"{field:>8}" for field in FIELDS))
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        opcua, modbus = free_port(), free_port()
        plant = subprocess.Popen([sys.executable, "-m", "edge_agent.demo.plant", "--opcua-port", str(opcua),
                                  "--modbus-port", str(modbus)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(opcua, time.monotonic() + 60)
            wait_port(modbus, time.monotonic() + 60)
            for run in range(args.repeat):
                for index, checkout in enumerate(checkouts):
                    data = work / f"data-{run}-{index}"
                    data.mkdir()
                    _, text = demo_config(f"opc.tcp://127.0.0.1:{opcua}/plant", modbus, data, web_port=free_port())
                    (data / "agent.toml").write_text(text)
                    for start in ("fresh", "restart"):
                        figures = measure(checkout, data / "agent.toml", args.seconds, work / "agent.log")
                        print(f"{str(checkout)[-40:]:<40} {start:<8} "
                              + " ".join(f"{figures.get(field, 0):8.1f}" for field in FIELDS), flush=True)
        finally:
            plant.terminate()
            plant.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
