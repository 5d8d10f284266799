"""`nimu-rt setup-bucket`: CORS and lifecycle rules, applied idempotently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nimu_rt.cli import main
from nimu_rt.storage.bucket import setup_bucket
from nimu_rt.storage.r2 import R2Storage
from tests.conftest import S3Endpoint
from tests.storage.conftest import StorageFactory
from tests.storage.s3proxy import S3Proxy

ORIGIN = "https://app.example.com"
THEIRS = {
    "ID": "theirs",
    "Status": "Enabled",
    "Filter": {"Prefix": "tmp/"},
    "Expiration": {"Days": 1},
}


async def rules(storage: R2Storage) -> tuple[list[Any], list[Any]]:
    cors = await storage.request("get_bucket_cors")
    lifecycle = await storage.request("get_bucket_lifecycle_configuration")
    return cors["CORSRules"], lifecycle["Rules"]


async def test_setup_twice_gives_the_same_bucket(
    make_r2: StorageFactory, proxy: S3Proxy
):
    storage = await make_r2(cors_origins=[ORIGIN], abort_incomplete_after_days=3)
    assert isinstance(storage, R2Storage)
    # A rule added by someone else (say, in the dashboard) must survive.
    await storage.request(
        "put_bucket_lifecycle_configuration",
        LifecycleConfiguration={"Rules": [THEIRS]},
    )
    proxy.seen.clear()

    first = await setup_bucket(storage)
    after_first = await rules(storage)
    writes = [s for s in proxy.seen if s.method == "PUT"]
    proxy.seen.clear()
    second = await setup_bucket(storage)
    after_second = await rules(storage)

    assert first == [
        f"cors: updated (origins {ORIGIN})",
        "lifecycle: updated (abort unfinished uploads after 3 days)",
    ]
    assert second == [
        f"cors: unchanged (origins {ORIGIN})",
        "lifecycle: unchanged (abort unfinished uploads after 3 days)",
    ]
    assert [s for s in proxy.seen if s.method == "PUT"] == []
    assert after_first == after_second
    (cors,) = after_first[0]
    assert cors["AllowedOrigins"] == [ORIGIN]
    assert set(cors["AllowedMethods"]) == {"GET", "HEAD", "PUT"}
    assert "Range" in cors["AllowedHeaders"]
    assert {"ETag", "Content-Range"} <= set(cors["ExposeHeaders"])
    lifecycle = {rule["ID"]: rule for rule in after_first[1]}
    assert lifecycle["theirs"]["Expiration"] == {"Days": 1}
    ours = lifecycle["nimu-rt-abort-incomplete-uploads"]
    assert ours["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 3}
    # R2 lists the SDK checksum headers as not implemented on these calls.
    assert {s.operation for s in writes} == {
        "PutBucketCors",
        "PutBucketLifecycleConfiguration",
    }
    for write in writes:
        assert "content-md5" in write.headers
        assert not any(name.startswith("x-amz-checksum") for name in write.headers)
        assert "x-amz-sdk-checksum-algorithm" not in write.headers


async def test_a_changed_setting_rewrites_only_our_rule(make_r2: StorageFactory):
    storage = await make_r2(abort_incomplete_after_days=3)
    assert isinstance(storage, R2Storage)
    await setup_bucket(storage)
    changed = await make_r2(abort_incomplete_after_days=5)
    assert isinstance(changed, R2Storage)

    report = await setup_bucket(changed)

    assert report == [
        "cors: skipped (storage.cors_origins is empty)",
        "lifecycle: updated (abort unfinished uploads after 5 days)",
    ]
    assert isinstance(changed, R2Storage)
    (rule,) = (await changed.request("get_bucket_lifecycle_configuration"))["Rules"]
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 5}


def test_the_command(
    s3_endpoint: S3Endpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setenv("NIMU_SERVER_DATA_DIR", str(tmp_path))
    for key, value in s3_endpoint.storage_settings().items():
        monkeypatch.setenv(f"NIMU_STORAGE_{key.upper()}", str(value))
    monkeypatch.setenv("NIMU_STORAGE_CORS_ORIGINS", f'["{ORIGIN}"]')

    assert main(["setup-bucket"]) == 0
    assert main(["setup-bucket"]) == 0

    lines = capsys.readouterr().out.splitlines()
    bucket = s3_endpoint.bucket
    assert lines[0] == f"{bucket}: cors: updated (origins {ORIGIN})"
    assert lines[2] == f"{bucket}: cors: unchanged (origins {ORIGIN})"
    assert lines[3].startswith(f"{bucket}: lifecycle: unchanged")

    monkeypatch.setenv("NIMU_STORAGE_BACKEND", "local")
    assert main(["setup-bucket"]) == 2
    assert "local backend needs no setup" in capsys.readouterr().err
