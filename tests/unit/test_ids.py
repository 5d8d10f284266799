"""Generation ids: UUIDv7, and in creation order even within a millisecond."""

from __future__ import annotations

import uuid

from nimu_rt.ids import is_id, new_id


def test_ids_are_version_7_uuids():
    value = new_id()
    parsed = uuid.UUID(value)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert is_id(value)
    assert not is_id(value.upper())
    assert not is_id("not-an-id")


def test_ids_made_in_a_burst_sort_in_creation_order():
    # Thousands fit in one millisecond; list order must still be creation
    # order, or "newest first" pages would shuffle.
    made = [new_id() for _ in range(20_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
