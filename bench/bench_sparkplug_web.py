"""Sparkplug B payload cost against the JSON telemetry it sits beside, and the web page's render cost.

    .venv/bin/python bench/bench_sparkplug_web.py [--samples 1000] [--points 1000] [--rounds 200]

Encoding: CPU per sample of a DDATA of ``--samples`` float samples (protobuf, Quality property on
each metric), of stamping its seq at publish time, and of re-marking it historical for a replay,
each as a ratio to the JSON telemetry encoder measured in the same run (the machine is noisy, the
ratio less so). Web: the time to render the overview page of ``--points`` points in 10 devices and
a 400-bucket trend chart, which run on the event loop (the queries behind them do not).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.base import Reading
from edge_agent import config as config_mod
from edge_agent.cloud import payloads
from edge_agent.cloud import sparkplug as spb
from edge_agent.service import webpages
from edge_agent.service.status import GatewayStatus
from edge_agent.store.messages import Stamp
from edge_agent.store.writer import TwinState


def cpu_per_call(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm up
    began = time.process_time()
    for _ in range(rounds):
        fn()
    return (time.process_time() - began) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    now = time.time()
    readings = [Reading(f"dev{i % 10}.p{i}", 20.0 + i * 0.001, "good", now + i * 1e-4) for i in range(args.samples)]
    samples = [spb.Sample(r.point, spb.DOUBLE, r.value, r.quality, r.ts) for r in readings]
    encoder = payloads.TelemetryEncoder("gw")
    json_s = cpu_per_call(lambda: encoder.encode(readings, Stamp(1)), args.rounds)
    ddata = spb.ddata(samples)
    spb_s = cpu_per_call(lambda: spb.ddata(samples), args.rounds)
    seq_s = cpu_per_call(lambda: spb.with_seq(ddata, 42), args.rounds)
    hist_s = cpu_per_call(lambda: spb.as_historical(ddata), args.rounds)
    json_bytes = len(encoder.encode(readings, Stamp(1)))
    n = args.samples
    print(f"{n} samples per message, {args.rounds} rounds, CPU per sample:")
    print(f"  JSON telemetry (baseline)   {json_s / n * 1e6:7.3f} us   {json_bytes / n:6.1f} bytes/sample")
    print(f"  Sparkplug DDATA (protobuf)  {spb_s / n * 1e6:7.3f} us   {len(ddata) / n:6.1f} bytes/sample   "
          f"x{spb_s / json_s:.2f} of JSON")
    print(f"  seq stamped at publish      {seq_s * 1e6:7.3f} us per message")
    print(f"  re-marked historical        {hist_s / n * 1e6:7.3f} us   x{hist_s / json_s:.2f} of JSON (replay only)")

    devices = "\n".join(
        f'[[devices]]\nname = "dev{d}"\nprotocol = "modbus"\nhost = "127.0.0.1"\n'
        + "".join(f'  [[devices.points]]\n  name = "dev{d}.p{i}"\n  address = {i}\n  unit = "bar"\n'
                  for i in range(args.points // 10)) for d in range(10))
    cfg = config_mod.loads(f'[agent]\nid = "gw"\ndata_dir = "/tmp"\n{devices}', Path("/tmp/bench.toml"))
    status = GatewayStatus(ts=now, started=now - 60, gateway="gw", site="s", config=cfg.source, devices=(),
                           models=(), twin=TwinState(0, 0, 0, 0, 0, 0.0, 0.0), mqtt=None, optimizer_mode=None,
                           dead_parts=(), errors=())
    rows = {name: {"name": name, "value": 1.5, "quality": "good", "ts": now - 1, "unit": unit}
            for name, _, unit in cfg.all_points()}
    writes = [{"ts": now, "source": "operator", "actor": "a", "point": "dev0.p0", "requested": 1.0, "written": 1.0,
               "readback": 1.0, "result": "applied", "reason": ""}] * 20
    events = [{"ts": now, "source": "m", "kind": "anomaly", "state": "raised", "score": 5.0, "message": "x"}] * 20
    page_s = cpu_per_call(lambda: webpages.overview(status, cfg, rows, writes, events, "", now),
                          max(5, args.rounds // 20))
    buckets = [{"first_ts": now - 3600 + i * 9, "last_ts": now - 3600 + i * 9 + 8, "avg": float(i % 50),
                "min": float(i % 50) - 1, "max": float(i % 50) + 1, "n": 9} for i in range(400)]
    chart_s = cpu_per_call(lambda: webpages.chart_svg("dev0.p0", "bar", buckets, now - 3600, now), args.rounds)
    size = len(webpages.overview(status, cfg, rows, writes, events, "", now))
    print(f"web overview, {len(rows)} points in 10 devices: {page_s * 1e3:.2f} ms CPU per render "
          f"({size / 1024:.0f} KiB)")
    print(f"web trend chart, 400 buckets: {chart_s * 1e3:.2f} ms CPU per render")


if __name__ == "__main__":
    main()
