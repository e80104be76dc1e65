"""
Rate limits: a token bucket per key (a sending account, a remote domain),
with an exempt list (draft 6.4 item 4).
"""

from __future__ import annotations

import attrs

#: Buckets kept at most; full buckets are forgotten first when there are
#: more (a forgotten bucket starts full, so nothing is lost by it).
MAX_BUCKETS = 100000


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """
    Token buckets by key: C{rate} tokens a second, at most C{burst} saved;
    each request takes one.

    @ivar refusals: requests refused so far.
    """

    def __init__(self, clock, rate, burst, exempt=()):
        """
        @param clock: an L{IReactorTime} provider.
        @param rate: tokens added per second; 0 disables the limit.
        @param burst: the most tokens a bucket holds.
        @param exempt: keys never limited.
        """
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.exempt = frozenset(exempt)
        self.refusals = 0
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key):
        """
        Take one token from C{key}'s bucket.

        @return: L{None} if the request may go on, else the seconds until
            a token is available (at least 1, for RETRY_AFTER).
        """
        if not self.rate or key in self.exempt:
            return None
        now = self.clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forgetFull(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate
            )
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        self.refusals += 1
        return max(1, int((1.0 - bucket.tokens) / self.rate + 0.999))

    def _forgetFull(self, now):
        """
        Drop the buckets that have refilled, or the oldest half if none has.
        """
        full = [
            key
            for key, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate >= self.burst
        ]
        if not full:
            full = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            full = full[: len(full) // 2]
        for key in full:
            del self._buckets[key]
