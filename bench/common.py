"""Helpers shared by the benchmark scripts: CPU and memory clocks, free ports, result tables.

CPU time is ``user + sys`` from ``getrusage(RUSAGE_SELF)``: every thread of the process,
including the twin writer that runs in ``asyncio.to_thread``. A simulated device server runs
in a child process so its CPU is never counted against the agent; its own CPU is read from
``/proc/<pid>/stat`` (Linux) to check that it keeps up.
"""

from __future__ import annotations

import os
import resource
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds() -> float:
    """CPU time (user + sys) this process has used so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + sys) of another process, from /proc; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            # the command name (field 2) may hold spaces; fields after its ")" are plain
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


@dataclass(slots=True)
class Sample:
    """One reading of the clocks at the edge of a measuring window."""

    wall: float
    cpu: float
    count: int
    other_cpu: float | None = None


def sample(count: int, other_pid: int | None = None) -> Sample:
    """The clocks now, with a counter the caller keeps (points stored, points read...)."""
    other = process_cpu_seconds(other_pid) if other_pid is not None else None
    return Sample(time.perf_counter(), cpu_seconds(), count, other)


@dataclass(slots=True)
class Window:
    """What happened between two samples."""

    seconds: float
    cpu: float
    count: int
    other_cpu: float | None = None

    @classmethod
    def between(cls, start: Sample, end: Sample) -> Window:
        other = None
        if start.other_cpu is not None and end.other_cpu is not None:
            other = end.other_cpu - start.other_cpu
        return cls(end.wall - start.wall, end.cpu - start.cpu, end.count - start.count, other)

    @property
    def rate(self) -> float:
        """Counted items per wall-clock second."""
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def us_per_item(self) -> float:
        """CPU microseconds per counted item."""
        return 1e6 * self.cpu / self.count if self.count else float("nan")

    @property
    def cpu_share(self) -> float:
        """CPU use as a share of one core (1.0 = one core busy all the time)."""
        return self.cpu / self.seconds if self.seconds > 0 else 0.0

    @property
    def other_share(self) -> float | None:
        return self.other_cpu / self.seconds if self.other_cpu is not None and self.seconds > 0 else None


def command_line() -> str:
    """The command that ran this script, ready to paste into a shell."""
    return shlex.join([os.path.relpath(sys.executable), *sys.argv])


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table, columns aligned, first column left, the rest right."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate((header, *rows)):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  " + "  ".join(cells))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))
