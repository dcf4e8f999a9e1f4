"""Benchmark: what one history sample costs ``Twin.write_batch``, rows (before issue 13) vs blocks.

The plant's shape: every device read gives ``--chunk`` readings (float values) one timestamp;
the writer flushes ``--flush`` samples at a time; the twin already holds ``--existing`` samples
(its indexes as deep as in the field). Two twins are filled, one by this tree's ``Twin`` (history
in blocks) and one by the ``Twin`` of ``--baseline`` (``git show REF:edge_agent/store/twin.py``,
history one row per sample), then ``--flushes`` flushes are timed on each, alternating, so a busy
neighbour on a shared machine slows both alike. The points table is not updated
(``update_points=False``, as on most flushes), no deadband.

Reported per twin: wall and CPU microseconds per sample (median and mean over the flushes), bytes
on disk per sample, and the time to read one point's whole history back, through
``TwinView.history`` (which reads either schema) and by plain SQL on ``history`` (the old table,
or the view).

Run ``python bench/bench_history.py --help``.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from common import command_line, print_table

from drivers.base import Reading
from edge_agent.store import twin as blocks_twin
from edge_agent.store.sqlite import file_bytes
from edge_agent.store.views import TwinView

ROOT = Path(__file__).resolve().parent.parent
WriteBatch = Callable[..., Sequence[Reading]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2_500, help="points, in devices of --chunk points (2500)")
    parser.add_argument("--chunk", type=int, default=100, help="readings per device read, sharing one ts (100)")
    parser.add_argument("--flush", type=int, default=10_000, help="samples per write_batch (10000)")
    parser.add_argument("--existing", type=int, default=1_000_000, help="samples in each twin before timing (1000000)")
    parser.add_argument("--flushes", type=int, default=40, help="timed flushes on each twin (40)")
    parser.add_argument("--baseline", default="main", help="git revision whose twin.py stores rows (main)")
    parser.add_argument("--no-baseline", action="store_true", help="time this tree's twin only")
    parser.add_argument("--dir", type=Path, help="where the twin files go (default: a temporary directory)")
    return parser.parse_args(argv)


def baseline_module(revision: str, folder: Path) -> ModuleType:
    """The twin module as it was at ``revision``, imported under another name beside this tree's."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:edge_agent/store/twin.py"],
                            capture_output=True, text=True, check=False)
    if source.returncode != 0:
        raise SystemExit(f"cannot read the baseline twin.py at {revision!r}: {source.stderr.strip()} "
                         "(use --no-baseline)")
    path = folder / "twin_baseline.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("twin_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Plant:
    """Flushes of device reads: ``points`` points in devices of ``chunk``, one ts per read."""

    def __init__(self, points: int, chunk: int, flush: int) -> None:
        self.devices = [[f"dev{d}.p{i}" for i in range(chunk)] for d in range(max(1, points // chunk))]
        self.reads_per_flush = max(1, flush // chunk)
        self.next_device = 0
        self.ts = 1_700_000_000.0
        self.rng = random.Random(13)

    def flush(self) -> list[tuple[float, list[Reading]]]:
        chunks = []
        for _ in range(self.reads_per_flush):
            names = self.devices[self.next_device]
            self.next_device = (self.next_device + 1) % len(self.devices)
            self.ts += 0.004  # 25,000 samples/s in reads of 100
            values = [self.rng.uniform(0.0, 100.0) for _ in names]
            chunks.append((self.ts, [Reading(n, v, "good", self.ts) for n, v in zip(names, values, strict=True)]))
        return chunks


def fill(write: WriteBatch, plant: Plant, samples: int, label: str) -> None:
    stored, began = 0, time.perf_counter()
    while stored < samples:
        stored += len(write(plant.flush(), update_points=False))
    print(f"[{label}] filled {stored:,} samples in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)


def timed(write: WriteBatch, chunks: list[tuple[float, list[Reading]]]) -> tuple[float, float, int]:
    """(wall s, CPU s, samples) of one write_batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    kept = write(chunks, update_points=False)
    return time.perf_counter() - wall, time.process_time() - cpu, len(kept)


def query_seconds(path: Path, point: str, since: float) -> tuple[str, str]:
    """One point's samples since ``since``: through TwinView.history, and by SQL on ``history`` (the
    table, or the view), as sqlite3 or Datasette would ask. Each as "<ms> ms (<rows>)"."""
    with TwinView.open(path) as view:
        began = time.perf_counter()
        rows = view.history(point, since)
        viewer = f"{1e3 * (time.perf_counter() - began):.0f} ms ({len(rows)})"
        began = time.perf_counter()
        rows = view.db.conn.execute("SELECT point, value, quality, ts FROM history WHERE point = ? AND ts > ? "
                                    "ORDER BY ts", (point, since)).fetchall()
        sql = f"{1e3 * (time.perf_counter() - began):.0f} ms ({len(rows)})"
    return viewer, sql


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        kinds: dict[str, Any] = {"blocks (this tree)": blocks_twin}
        if not args.no_baseline:
            kinds = {f"rows ({args.baseline})": baseline_module(args.baseline, Path(tmp)), **kinds}
        twins, plants, paths = {}, {}, {}
        for n, (label, module) in enumerate(kinds.items()):
            paths[label] = folder / f"twin-{n}.db"
            for stale in folder.glob(f"twin-{n}.db*"):
                stale.unlink()
            twins[label] = module.Twin.open(paths[label])
            plants[label] = Plant(args.points, args.chunk, args.flush)
            fill(twins[label].write_batch, plants[label], args.existing, label)
        results: dict[str, list[tuple[float, float, int]]] = {label: [] for label in kinds}
        for _ in range(args.flushes):
            for label, twin in twins.items():
                results[label].append(timed(twin.write_batch, plants[label].flush()))
        rows = []
        for label, twin in twins.items():
            twin.close()
            runs = results[label]
            wall = [1e6 * w / n for w, _, n in runs]
            cpu = [1e6 * c / n for _, c, n in runs]
            total = sum(n for _, _, n in runs) + args.existing
            viewer, sql = query_seconds(paths[label], "dev0.p7", 0.0)
            rows.append((label, f"{statistics.median(wall):.2f}", f"{statistics.fmean(wall):.2f}",
                         f"{statistics.median(cpu):.2f}", f"{statistics.fmean(cpu):.2f}",
                         f"{file_bytes(paths[label]) / total:.1f}", viewer, sql))
    print(f"\n{command_line()}")
    print(f"{args.points:,} points in reads of {args.chunk}, flushes of {args.flush:,} samples, "
          f"{args.existing:,} samples already stored, {args.flushes} timed flushes per twin")
    print_table("write_batch per sample (us)",
                ("history", "wall med", "wall mean", "CPU med", "CPU mean", "bytes/sample", "TwinView.history",
                 "SQL on history"), rows)
    print("\nlast two columns: reading one point's whole history back (rows found)")


if __name__ == "__main__":
    main()
