"""Fixtures of the storage tests: backends, a recording proxy, sources."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from nimu_rt.errors import Veo3Retryable
from nimu_rt.storage import Storage, create_storage
from tests.conftest import S3Endpoint
from tests.storage.s3proxy import S3Proxy
from tests.support import make_settings

MiB = 1024 * 1024
PART = 5 * MiB  # the smallest part size R2 allows, to keep tests quick

StorageFactory = Callable[..., Any]


class Source:
    """A download to upload from: given bytes, served in odd-sized chunks.

    Records the offset of every open (as the Veo 3 client's Range requests
    would), and can break off once at a given byte like a dropped download.
    """

    def __init__(
        self, data: bytes, *, chunk_bytes: int = 100_003, break_at: int | None = None
    ) -> None:
        self.data = data
        self.chunk_bytes = chunk_bytes
        self.break_at = break_at
        self.opened_at: list[int] = []

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def __call__(self, offset: int) -> AsyncIterator[bytes]:
        self.opened_at.append(offset)
        return self._stream(offset)

    async def _stream(self, offset: int) -> AsyncIterator[bytes]:
        position = offset
        while position < len(self.data):
            end = min(len(self.data), position + self.chunk_bytes)
            if self.break_at is not None and position < self.break_at <= end:
                end = self.break_at
                yield self.data[position:end]
                self.break_at = None
                raise Veo3Retryable("the download connection was reset")
            yield self.data[position:end]
            position = end


def payload(size: int, seed: int = 1) -> bytes:
    """``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


@pytest.fixture(params=["local", "r2"])
def storage_kind(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over both storage backends."""
    return str(request.param)


@pytest.fixture
async def make_storage(
    storage_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[StorageFactory]:
    """Opens storages of the current backend with ``[storage]`` overrides.

    An R2 storage may be pointed elsewhere with ``endpoint_url`` (the
    proxy); all are closed at teardown.
    """
    endpoint: S3Endpoint | None = None
    if storage_kind == "r2":
        endpoint = request.getfixturevalue("s3_endpoint")
    opened: list[Storage] = []

    async def make(**overrides: Any) -> Storage:
        overrides.setdefault("part_size_bytes", PART)
        if endpoint is not None:
            table = endpoint.storage_settings(**overrides)
        else:
            table = {"backend": "local", **overrides}
        settings = make_settings(tmp_path / "data", {"storage": table})
        storage = create_storage(settings)
        await storage.open()
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        await storage.close()


@pytest.fixture
async def proxy(s3_endpoint: S3Endpoint) -> AsyncIterator[S3Proxy]:
    """A recording, fault-injecting proxy in front of the test bucket's server."""
    async with S3Proxy(s3_endpoint.url) as running:
        yield running


@pytest.fixture
async def make_r2(
    s3_endpoint: S3Endpoint, proxy: S3Proxy, tmp_path: Path
) -> AsyncIterator[StorageFactory]:
    """Opens R2 storages that reach moto through :func:`proxy`."""
    opened: list[Storage] = []

    async def make(**overrides: Any) -> Storage:
        overrides.setdefault("part_size_bytes", PART)
        table = s3_endpoint.storage_settings(endpoint_url=proxy.url, **overrides)
        settings = make_settings(tmp_path / "data", {"storage": table})
        storage = create_storage(settings)
        await storage.open()
        opened.append(storage)
        return storage

    yield make
    for storage in opened:
        await storage.close()


async def read_all(storage: Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read_stream(key)])
