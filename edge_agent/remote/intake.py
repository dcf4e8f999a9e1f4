"""What arrives on the ``cmd`` topic before anyone has proven who sent it, and what it may cost.

Anyone allowed to publish on the ``cmd`` topic can send anything, as fast as the broker relays it.
Until a message's signature has been verified it is *unverified*, and it gets only bounded work:

- **Small messages** (at most :data:`SMALL` bytes) are parsed and verified at once on the event
  loop: a bounded cost (well under a millisecond) that buys the ability to tell a signed command
  from junk, so a signed command is never queued behind a flood.
- **Large messages** pass a byte budget (:data:`BIG_RATE` bytes per second, bursts of two
  ``max_payload``) before they are parsed and verified in a worker thread, one at a time, with at
  most :data:`BIG_QUEUE` waiting; the rest are dropped unread and counted. A verified message
  gives its bytes back, so operators do not spend the budget meant for strangers.
- **Refusals** of unverified messages (and of replays, however well signed) are answered and
  audited within a budget of ``answer_rate`` per second, bursts of ``answer_burst``; beyond it
  they are only counted. Their audit records keep sizes, a hash and a short escaped prefix of
  each field (:func:`field_summary`), never the fields themselves.
- **Logs**: the first refusal of an interval is logged at once; the rest of the interval becomes
  one summary line, and one ``command`` audit event of state ``suppressed`` when some refusals
  went unrecorded (:meth:`Intake.summary`).

So a flood costs a bounded share of one core, a few hundred bytes of twin and outbox per second
at most, and two log lines a minute.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.pacing import TokenBucket
from edge_agent.remote.envelope import short

log = logging.getLogger(__name__)

SMALL = 16 * 1024  # bytes: checked on the event loop as it arrives
BIG_RATE = 8 * 1024 * 1024  # bytes per second of large unverified messages parsed and verified
BIG_QUEUE = 2  # large messages waiting for the worker; more are dropped unread
SUMMARY_INTERVAL = 60.0  # seconds per flood summary
PREFIX = 32  # characters of a field kept in the audit record of an unverified message
DIGESTS = 256  # payload hashes of accepted commands remembered, to refuse exact replays unread


def digest(data: bytes) -> str:
    """The sha256 of ``data``, hex (hashlib drops the GIL for big inputs)."""
    return hashlib.sha256(data).hexdigest()


def field_summary(value: Any) -> dict[str, Any]:
    """How an audit record keeps a field nobody vouched for: size, hash and a short escaped prefix."""
    text = value if isinstance(value, str) else repr(value)[:4096]
    data = text.encode("utf-8", "surrogatepass")
    return {"bytes": len(data), "sha256": digest(data)[:16], "prefix": short(text, PREFIX)}


@dataclass
class _Interval:
    """What happened to unverified input since the last summary."""

    started: float
    refused: Counter[str] = field(default_factory=Counter)
    refused_bytes: int = 0
    answered: int = 0
    suppressed: int = 0
    dropped: int = 0
    dropped_bytes: int = 0

    @property
    def quiet(self) -> bool:
        return not self.refused and not self.dropped


class Intake:
    """Budgets and counters for unverified input (see the module docstring). Event loop only."""

    def __init__(self, *, answer_rate: float = 1.0, answer_burst: float = 60.0, big_rate: float = BIG_RATE,
                 big_burst: float = 8 * 1024 * 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._big = TokenBucket(big_rate, big_burst, clock=clock)
        self._answers = TokenBucket(answer_rate, answer_burst, clock=clock)
        self._interval = _Interval(clock())
        self._digests: OrderedDict[str, tuple[str, str]] = OrderedDict()  # sha256 -> (operator, id)
        # totals since start, for status and tests
        self.received = 0
        self.received_bytes = 0
        self.parsed = 0  # messages parsed and verified (exact replays of accepted commands are not)
        self.refused = 0
        self.dropped = 0
        self.suppressed = 0

    # ------------------------------------------------------------------ before parsing

    def resize(self, max_payload: int) -> None:
        """Let the largest allowed message through the byte budget, twice, when nothing else came."""
        self._big.burst = max(self._big.burst, 2.0 * max_payload)  # burst is a plain attribute

    def admit_big(self, size: int) -> bool:
        """Charge a large message to the byte budget; False: drop it unread (counted)."""
        if self._big.try_take(size):
            return True
        self.drop(size)
        return False

    def drop(self, size: int) -> None:
        """A message dropped unread (over the byte budget, or the queue is full)."""
        self.dropped += 1
        self._interval.dropped += 1
        self._interval.dropped_bytes += size
        if self._interval.dropped == 1 and not self._interval.refused:
            log.warning("commands: unverified messages over the budget of %d bytes/s are dropped unread; "
                        "a summary follows every %g s", BIG_RATE, SUMMARY_INTERVAL)

    def verified(self, size: int, *, big: bool) -> None:
        """A message proved its sender: give back the bytes it took from the budget."""
        if big:
            self._big.give_back(size)

    def count(self, size: int) -> None:
        self.received += 1
        self.received_bytes += size

    # ------------------------------------------------------------------ exact replays

    def replay_of(self, sha256: str) -> tuple[str, str] | None:
        """(operator, id) when exactly these bytes were accepted before."""
        return self._digests.get(sha256)

    def accepted(self, sha256: str, operator: str, command_id: str) -> None:
        self._digests[sha256] = (operator, command_id)
        self._digests.move_to_end(sha256)
        while len(self._digests) > DIGESTS:
            self._digests.popitem(last=False)

    # ------------------------------------------------------------------ refusals

    def refuse(self, code: str, size: int) -> bool:
        """Count a refused unverified message (or replay); True when it may be answered and audited."""
        self.refused += 1
        interval = self._interval
        interval.refused[code] += 1
        interval.refused_bytes += size
        if self._answers.try_take():
            interval.answered += 1
            return True
        interval.suppressed += 1
        self.suppressed += 1
        return False

    def first_of_interval(self) -> bool:
        """Whether the refusal just counted is the first of its interval (logged on its own)."""
        return sum(self._interval.refused.values()) == 1 and not self._interval.dropped

    def summary(self, *, force: bool = False) -> dict[str, Any] | None:
        """Close the interval when it is over: its counts as an audit record (None when it was quiet).

        Logs one line. The record is worth storing only when something went unrecorded
        (``suppressed`` or ``dropped`` above zero); the caller decides.
        """
        now = self._clock()
        interval = self._interval
        if not force and now - interval.started < SUMMARY_INTERVAL:
            return None
        self._interval = _Interval(now)
        if interval.quiet:
            return None
        seconds = now - interval.started
        codes = ", ".join(f"{code} {n}" for code, n in interval.refused.most_common())
        log.warning("commands: in the last %.0f s, %d unverified or replayed messages refused (%d bytes; %s): "
                    "%d answered and audited, %d only counted; %d dropped unread (%d bytes)", seconds,
                    sum(interval.refused.values()), interval.refused_bytes, codes or "none", interval.answered,
                    interval.suppressed, interval.dropped, interval.dropped_bytes)
        return {"seconds": round(seconds, 1), "refused": dict(interval.refused),
                "refused_bytes": interval.refused_bytes, "answered": interval.answered,
                "suppressed": interval.suppressed, "dropped": interval.dropped,
                "dropped_bytes": interval.dropped_bytes}
