"""Pacing: a token bucket (backlog replay, rejected-command noise) and the reconnect backoff."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class TokenBucket:
    """Rate limit for backlog replay: ``rate`` tokens per second, at most ``burst`` saved up.

    Tokens may be messages or samples. A take larger than ``burst`` is allowed once the bucket is
    full and leaves it in debt, so big messages still pass at the average rate. Pure: the clock
    (monotonic seconds) is injected.
    """

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or not burst > 0:
            raise ValueError(f"token bucket needs rate > 0 and burst > 0, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill()
        return self._tokens

    def wait_time(self, n: float = 1) -> float:
        """Seconds until :meth:`try_take` of ``n`` would succeed (0 when it would now)."""
        self._refill()
        missing = min(n, self.burst) - self._tokens
        return max(0.0, missing / self.rate)

    def try_take(self, n: float = 1) -> bool:
        """Take ``n`` tokens if the bucket allows it now; False (nothing taken) otherwise."""
        if self.wait_time(n) > 0:
            return False
        self._tokens -= n
        return True

    def give_back(self, n: float) -> None:
        """Return ``n`` tokens taken for work that turned out not to count (never above ``burst``)."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + n)


def backoff(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(high, low * (2 ** min(attempt, 30)))
    return rng.uniform(delay / 2, delay)
