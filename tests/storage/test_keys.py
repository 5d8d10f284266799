"""Object keys and the settings that shape storage."""

from __future__ import annotations

import pytest

from nimu_rt.errors import ConfigError, StorageError
from nimu_rt.storage import create_storage
from nimu_rt.storage.keys import (
    REFERENCE_PREFIX,
    check_key,
    is_reference_key_of,
    reference_key,
    thumbnail_key,
    video_key,
)
from tests.support import make_settings


def test_reference_keys_are_scoped_to_their_user():
    key = reference_key("alice", "image/webp")
    assert key.startswith(REFERENCE_PREFIX)
    assert key.startswith("refs/alice/") and key.endswith(".webp")
    assert is_reference_key_of(key, "alice")
    assert not is_reference_key_of(key, "bob")
    assert not is_reference_key_of("refs/alice/../bob/x.png", "alice")


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a//b", "a/./b", "a/../b", "..", "trailing/", "sp ace", "tab\t",
     "é", "x" * 1025],
)
def test_keys_that_could_escape_or_confuse_are_refused(key: str):
    with pytest.raises(StorageError, match="invalid storage key"):
        check_key(key)


def test_video_and_thumbnail_keys_sit_side_by_side():
    key = video_key("videos/", "alice", "0190-gen")
    assert key == "videos/alice/0190-gen.mp4"
    assert thumbnail_key(key) == "videos/alice/0190-gen.jpg"
    with pytest.raises(StorageError):
        video_key("videos/", "..", "g")


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"max_video_bytes": 10_000 * 5 * 1024 * 1024 + 1, "part_size_bytes": 5242880},
         "storage.max_video_bytes"),
        ({"max_connections": 4, "max_parallel_parts": 4}, "storage.max_connections"),
        ({"backend": "r2", "bucket": "b"}, "storage.endpoint_url"),
    ],
)
def test_settings_that_cannot_work_stop_the_start(tmp_path, storage, message):
    settings = make_settings(tmp_path, {"storage": storage})
    with pytest.raises(ConfigError, match=message):
        create_storage(settings)


def test_a_part_size_under_5_mib_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="storage.part_size_bytes"):
        make_settings(tmp_path, {"storage": {"part_size_bytes": 1024}})
