"""Identifiers: time-ordered UUIDs (version 7, RFC 9562).

Ids sort by creation time, so the newest-first lists page by id alone and an
index on id is also an index on age. They carry no user data.
"""

from __future__ import annotations

import os
import time
import uuid


def new_id() -> str:
    """A new UUIDv7 string: 48 bits of Unix milliseconds, 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (2**48 - 1)) << 80 | rand & (2**80 - 1)
    # Set the version (7) and the RFC 4122 variant bits.
    value = value & ~(0xF << 76) | 0x7 << 76
    value = value & ~(0x3 << 62) | 0x2 << 62
    return str(uuid.UUID(int=value))


def is_id(text: str) -> bool:
    """True when ``text`` is a canonical lowercase UUID string."""
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
