"""Benchmark: what a flood of unsigned input on the ``cmd`` topic costs the agent (issue 11).

The agent runs in this process (``config.loads`` -> ``Agent.start``, remote commands enabled, one fake
device), against a mosquitto with mutual TLS started here (``tests.mqtt_broker``). The flood is
published by ``mosquitto_pub`` processes (C, not this project's code), as fast as the broker takes
it, on the agent's ``cmd`` topic:

- ``--big`` MiB of unsigned commands of 2 MiB each: well-formed fields, a 64-byte ``sig`` of random
  bytes and a 700 KB unknown operator name (the issue's attack);
- 2,000 small unsigned commands of every kind (bad signatures of real operators, strangers, garbage);
- replays of one captured, correctly signed 4 MiB command.

Meanwhile an operator sends a signed ``ping`` every 0.2 s and times its answer. Reported, against a
quiet run of the same length in the same process: growth of data_dir (as a clean stop leaves it) and
of the log (the agent's key=value lines at INFO), both per 100 MB of input; the longest event-loop
stall (a 5 ms timer's worst lateness); the signed command's latency. Targets: disk + log growth
<= 1 MB per 100 MB, longest stall <= 100 ms, signed command answered within 2 s.

    .venv/bin/python bench/bench_hostile.py              # about 100 MB
    .venv/bin/python bench/bench_hostile.py --big 40     # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import command_line, print_table

from edge_agent.agent import Agent
from tests.commanding import CMD, RESPONSE, Keys, Operator, config_text, envelope, make_keys, started
from tests.flood import LoopWatch, disk_bytes, junk, metered_logs, publish
from tests.mqtt_broker import Broker, Recorder, make_pki

MB = 1024 * 1024


async def pinging(op: Operator, keys: Keys, until: asyncio.Event, latencies: list[float], period: float) -> None:
    """A signed ping every ``period`` s until ``until`` is set; every answer's latency."""
    while not until.is_set():
        began = time.monotonic()
        answer = await op.ask(envelope(keys, "carol", "ping"), timeout=30)
        if answer.get("ok") is not True:
            raise RuntimeError(f"signed ping refused: {answer}")
        latencies.append(time.monotonic() - began)
        await asyncio.sleep(max(0.0, period - (time.monotonic() - began)))


async def phase(tmp: Path, text: str, op: Operator, keys: Keys, flood: list[Any] | None,
                seconds: float | None) -> dict[str, Any]:
    """One run of the agent: quiet for ``seconds``, or until ``flood`` (publisher factories) is consumed."""
    agent = await started(tmp, text)
    data = agent.config.agent.data_dir
    handler = agent.commands
    assert handler is not None
    watch, done, latencies = LoopWatch().start(), asyncio.Event(), []  # type: ignore[var-annotated]
    pinger = asyncio.create_task(pinging(op, keys, done, latencies, 0.2))
    began = time.monotonic()
    try:
        if flood is None:
            assert seconds is not None
            await asyncio.sleep(seconds)
        else:
            senders = [start() for start in flood]
            for sender in senders:
                await asyncio.to_thread(sender.wait)
            if any(s.returncode for s in senders):
                raise RuntimeError(f"mosquitto_pub failed: {[s.stderr.read() for s in senders if s.returncode]}")
            # taken in once no flood message was refused or dropped for a second (the pings go on)
            quiet_since = time.monotonic()
            last = handler.intake.refused + handler.intake.dropped
            while time.monotonic() - quiet_since < 1.0:
                await asyncio.sleep(0.1)
                now = handler.intake.refused + handler.intake.dropped
                if now != last:
                    last, quiet_since = now, time.monotonic()
        elapsed = time.monotonic() - began
        done.set()
        await pinger
        stall = await watch.stop()
        handler.intake.summary(force=True)
        intake = {"received": handler.intake.received, "bytes": handler.intake.received_bytes,
                  "refused": handler.intake.refused, "suppressed": handler.intake.suppressed,
                  "dropped": handler.intake.dropped, "parsed": handler.intake.parsed}
    finally:
        pinger.cancel()
        await agent.stop()
    return {"seconds": elapsed, "stall": stall, "latencies": latencies, "disk": disk_bytes(data), **intake}


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as name:
        tmp = Path(name)
        pki = make_pki(tmp / "pki")
        keys = make_keys(tmp)
        with Broker(pki, tmp / "mosquitto") as broker, Recorder(broker, f"{RESPONSE}/#") as recorder, \
                metered_logs() as logs:
            text = config_text(tmp, broker, pki, keys, max_payload="4MiB", interval="1s")
            op = Operator(recorder)
            agent: Agent = await started(tmp, text)  # first start: the files exist, the schema is in
            await agent.stop()
            big = tmp / "big.json"
            big.write_bytes(junk(2 * MB))
            count = max(1, round(args.big * MB / len(big.read_bytes())))
            quick = tmp / "quick.txt"
            quick.write_bytes(b"\n".join([junk(2000, operator="alice"), junk(3000, operator_bytes=2000),
                                          b'{"not": "a command"', junk(500, operator="carol", name="write")] * 500)
                              + b"\n")
            captured = tmp / "captured.json"
            captured.write_bytes(json.dumps(envelope(keys, "alice", "ping", {"pad": "x" * (4 * MB - 400)},
                                                     validity=3600)).encode())
            replays = 4
            offered = count * big.stat().st_size + quick.stat().st_size + replays * captured.stat().st_size
            flood = [lambda: publish(broker, CMD, file=big, repeat=count), lambda: publish(broker, CMD, lines=quick),
                     lambda: publish(broker, CMD, file=captured, repeat=replays)]

            disk0, log0 = _disk(tmp), logs.bytes
            flooded = await phase(tmp, text, op, keys, flood, None)
            disk1, log1 = _disk(tmp), logs.bytes
            quiet = await phase(tmp, text, op, keys, None, flooded["seconds"])
            disk2, log2 = _disk(tmp), logs.bytes

    per = 100 * MB / offered
    grown, logged = disk1 - disk0, log1 - log0
    base_disk, base_log = disk2 - disk1, log2 - log1
    net = max(0, grown - base_disk) + max(0, logged - base_log)
    lat = flooded["latencies"] or [float("nan")]
    print(f"\n{command_line()}")
    print(f"offered {offered / MB:.1f} MB in {flooded['received']} messages over {flooded['seconds']:.1f} s; "
          f"{flooded['dropped']} dropped unread, {flooded['parsed']} parsed and verified, {flooded['refused']} "
          f"refused ({flooded['suppressed']} of them only counted)")
    print_table("unsigned flood on the cmd topic, against a quiet run of the same length", [
        "figure", "flood", "quiet", "per 100 MB of input (flood - quiet)", "target"], [
        ["data_dir growth (KiB)", f"{grown / 1024:.0f}", f"{base_disk / 1024:.0f}",
         f"{max(0, grown - base_disk) * per / 1024:.0f} KiB", ""],
        ["log growth (KiB)", f"{logged / 1024:.1f}", f"{base_log / 1024:.1f}",
         f"{max(0, logged - base_log) * per / 1024:.1f} KiB", ""],
        ["disk + log growth", "", "", f"{net * per / MB:.2f} MB", "<= 1 MB"],
        ["longest event-loop stall (ms)", f"{flooded['stall'] * 1000:.0f}", f"{quiet['stall'] * 1000:.0f}", "",
         "<= 100 ms"],
        ["signed ping answered, median (s)", f"{statistics.median(lat):.3f}",
         f"{statistics.median(quiet['latencies'] or [float('nan')]):.3f}", "", ""],
        ["signed ping answered, worst (s)", f"{max(lat):.3f}", f"{max(quiet['latencies'] or [float('nan')]):.3f}",
         f"({len(lat)} pings during the flood)", "<= 2 s"],
    ])


def _disk(tmp: Path) -> int:
    return disk_bytes(tmp / "data")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--big", type=float, default=80.0, help="MiB of 2 MiB unsigned messages (default 80; "
                                                                 "with the rest, about 100 MB in all)")
    asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
