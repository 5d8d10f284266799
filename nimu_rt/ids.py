"""Identifiers: time-ordered UUIDs (version 7, RFC 9562).

Ids sort by creation time, so the newest-first lists page by id alone and an
index on id is also an index on age. Within one process they are strictly
increasing, even for ids made in the same millisecond (RFC 9562's "monotonic
random" method: the random part is incremented). Across processes, ids of
the same millisecond sort in an arbitrary but fixed order. They carry no user
data.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_RANDOM_BITS = 74
_lock = threading.Lock()
_last_ms = 0
_last_random = 0


def new_id() -> str:
    """A new UUIDv7 string: 48 bits of Unix milliseconds, 74 random bits."""
    global _last_ms, _last_random
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # Same millisecond (or the clock stepped back): count on from the
            # last id so that order still follows creation.
            ms = _last_ms
            rand = _last_random + 1
            if rand >> _RANDOM_BITS:
                ms, rand = ms + 1, 0
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> (80 - _RANDOM_BITS)
            # Leave headroom so that increments rarely spill into a new ms.
            rand &= (1 << (_RANDOM_BITS - 1)) - 1
        _last_ms, _last_random = ms, rand
    # Layout: 48 bits ms | 4 bits version | 12 bits rand | 2 bits variant |
    # 62 bits rand.
    high, low = rand >> 62, rand & ((1 << 62) - 1)
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | high << 64 | 0x2 << 62 | low
    return str(uuid.UUID(int=value))


def is_id(text: str) -> bool:
    """True when ``text`` is a canonical lowercase UUID string."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
