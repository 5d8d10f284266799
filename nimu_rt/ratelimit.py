"""Token-bucket rate limits per user and per client address.

Each key (a user id, an IP address) has a bucket of ``burst`` tokens that
refills at ``rate_per_s``; a request takes one token from each bucket that
applies, or from none if any of them is empty. A refused request costs
nothing, so a client that backs off as told (``Retry-After``) gets through.

The buckets live in this process's memory: with N instances behind a load
balancer a caller can get up to N times the configured rate. At most
``max_keys`` buckets are kept; the one used longest ago is forgotten first,
which only ever makes a limit more lenient (a forgotten bucket is full).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class TokenBuckets:
    """Buckets of one limit (e.g. "per user"), keyed by a string."""

    def __init__(
        self,
        name: str,
        *,
        rate_per_s: float,
        burst: int,
        max_keys: int,
    ) -> None:
        self.name = name
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def level(self, key: str, now: float) -> float:
        """Tokens in ``key``'s bucket at ``now``, refilled, not taken."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(self.burst)
        elapsed = max(0.0, now - bucket.updated)
        return min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)

    def take(self, key: str, now: float) -> float:
        """Take one token (the caller checked :meth:`level`); tokens left."""
        tokens = self.level(key, now) - 1.0
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = _Bucket(tokens, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            bucket.tokens = tokens
            bucket.updated = now
            self._buckets.move_to_end(key)
        return tokens

    def seconds_until(self, tokens: float, wanted: float) -> float:
        """Seconds for a bucket holding ``tokens`` to hold ``wanted``."""
        return max(0.0, (wanted - tokens) / self.rate_per_s)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a rate limit said about one request, for its headers.

    ``limit``, ``remaining`` and ``reset_s`` describe the most restrictive
    bucket that applied (its capacity, whole tokens left, seconds until it
    is full again); ``retry_after_s`` and ``limited_by`` are set when the
    request was refused.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after_s: int = 0
    limited_by: str | None = None


class RateLimiter:
    """Applies several :class:`TokenBuckets` to one request, all or none."""

    def __init__(
        self,
        limits: list[TokenBuckets],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {limit.name: limit for limit in limits}
        self._clock = clock

    def check(self, keys: dict[str, str]) -> Decision:
        """Take a token from each named limit's bucket for ``keys[name]``.

        ``keys`` maps a limit's name to the key of this request in it
        (names without a limit are ignored). Takes nothing when any bucket
        is empty.
        """
        now = self._clock()
        applied = [
            (self.limits[name], key) for name, key in keys.items()
            if name in self.limits
        ]
        for limit, key in applied:
            level = limit.level(key, now)
            if level < 1.0:
                return Decision(
                    allowed=False,
                    limit=limit.burst,
                    remaining=0,
                    reset_s=math.ceil(limit.seconds_until(level, limit.burst)),
                    retry_after_s=max(1, math.ceil(limit.seconds_until(level, 1.0))),
                    limited_by=limit.name,
                )
        tightest: Decision | None = None
        for limit, key in applied:
            left = limit.take(key, now)
            decision = Decision(
                allowed=True,
                limit=limit.burst,
                remaining=max(0, math.floor(left)),
                reset_s=math.ceil(limit.seconds_until(left, limit.burst)),
            )
            if tightest is None or decision.remaining < tightest.remaining:
                tightest = decision
        if tightest is None:
            return Decision(allowed=True, limit=0, remaining=0, reset_s=0)
        return tightest
