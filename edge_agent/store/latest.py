"""Every point's latest reading, in memory, for the gate, the models, status and the web page.

Every reading a device delivers passes through here, but the latest values are looked up far less
often than they change (a model or the optimizer once an interval, the gate on a write, a page
when it is asked for). So a whole device read (:class:`~drivers.base.DeviceRead`) is taken as it
is, one dictionary entry per read, and its points' entries are made from the newest read of each
device only when someone looks: at 10 devices x 100 points every 100 ms, a hundred reads a
second cost a hundred small stores instead of ten thousand Reading tuples and entries.

Order is kept: a plain list of readings (a model's outputs, a device's points marked bad or stale,
a read with a bad block) first folds in the reads waiting before it, so whatever came last wins,
as with a plain dictionary. Used on the event loop only (and by the writer's restore at start,
before any device runs).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from operator import itemgetter

from drivers.base import DeviceRead, Reading

_NAME = itemgetter(0)


class Latest(MutableMapping[str, Reading]):
    """A mapping of point name to its latest :class:`~drivers.base.Reading`; :meth:`take` feeds it."""

    __slots__ = ("_readings", "_reads")

    def __init__(self) -> None:
        self._readings: dict[str, Reading] = {}
        # the newest read of each set of points not folded in yet, oldest first
        self._reads: dict[tuple[str, ...], DeviceRead] = {}

    def take(self, readings: Sequence[Reading]) -> None:
        """Readings just delivered: from now on the latest of their points."""
        if isinstance(readings, DeviceRead):
            reads = self._reads
            # pop first, so the insertion order stays the order of arrival
            reads.pop(readings.names, None)
            reads[readings.names] = readings
            return
        self._current().update(zip(map(_NAME, readings), readings, strict=True))  # per reading in C

    def _current(self) -> dict[str, Reading]:
        """The latest readings, with the reads waiting folded in first."""
        if self._reads:
            reads, self._reads = self._reads, {}
            readings = self._readings
            for read in reads.values():
                readings.update(zip(read.names, read.readings, strict=True))
        return self._readings

    def __getitem__(self, name: str) -> Reading:
        return self._current()[name]

    def get(self, name: str, default: Reading | None = None) -> Reading | None:  # type: ignore[override]
        return self._current().get(name, default)

    def __setitem__(self, name: str, reading: Reading) -> None:
        self._current()[name] = reading

    def __delitem__(self, name: str) -> None:
        del self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __contains__(self, name: object) -> bool:
        return name in self._current()

    def __repr__(self) -> str:
        return f"Latest({dict(self)!r})"


