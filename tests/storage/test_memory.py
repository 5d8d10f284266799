"""Peak memory of a 200 MiB upload stays near part size x (parallel + 1).

The moto server runs in a child process here: in this process it would
count its own copy of every byte received in the measurement.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from nimu_rt.storage import create_storage
from tests.storage.conftest import PART, MiB, payload
from tests.support import WAIT_S, make_settings

pytestmark = pytest.mark.slow

TOTAL_BYTES = 200 * MiB
CHUNK_BYTES = 64 * 1024
PARALLEL = 2
# What the upload may hold beyond its part buffers: a source chunk, the
# 64 KiB pieces aiohttp sends and botocore hashes, and the bookkeeping of
# the requests in flight (measured: about 0.6 MiB).
OVERHEAD_BYTES = 2 * MiB

_CHILD = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.WARNING)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""


@pytest.fixture(scope="module")
def moto_elsewhere() -> Iterator[str]:
    """A moto server in a child process; stops when its stdin closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.wait(timeout=WAIT_S)
        child.stdout.close()


async def test_200_mib_upload_peak_memory(moto_elsewhere: str, tmp_path: Path):
    bucket = "memory"
    async with httpx.AsyncClient(base_url=moto_elsewhere, timeout=WAIT_S) as http:
        body = (
            "<CreateBucketConfiguration><LocationConstraint>auto"
            "</LocationConstraint></CreateBucketConfiguration>"
        )
        (await http.put(f"/{bucket}", content=body)).raise_for_status()
    settings = make_settings(
        tmp_path,
        {
            "storage": {
                "backend": "r2",
                "endpoint_url": moto_elsewhere,
                "bucket": bucket,
                "access_key_id": "test",
                "secret_access_key": "test",
                "part_size_bytes": PART,
                "max_parallel_parts": PARALLEL,
            }
        },
    )
    storage = create_storage(settings)
    await storage.open()
    block = payload(1 * MiB + 3)
    expected = hashlib.sha256()

    async def source_at(offset: int) -> AsyncIterator[bytes]:
        assert offset == 0
        sent = 0
        while sent < TOTAL_BYTES:
            start = sent % len(block)
            size = min(CHUNK_BYTES, TOTAL_BYTES - sent, len(block) - start)
            chunk = block[start : start + size]
            expected.update(chunk)
            sent += size
            yield chunk

    try:
        # Warm up: botocore loads models and endpoint rules on first use,
        # once per process; that is not the upload's memory.
        warm = payload(PART + 1, seed=2)
        await storage.upload_stream(
            "warm", lambda _: _once(warm), content_type="video/mp4"
        )
        tracemalloc.start()
        try:
            stored = await storage.upload_stream(
                "big.mp4", source_at, content_type="video/mp4"
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await storage.close()

    assert stored.size_bytes == TOTAL_BYTES
    assert stored.sha256 == expected.hexdigest()
    bound = PART * (PARALLEL + 1)
    print(f"peak {peak / MiB:.1f} MiB for a bound of {bound / MiB:.0f} MiB")
    assert peak <= bound + OVERHEAD_BYTES


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
