"""Test helpers that are not fixtures: real servers on port 0, PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from starlette.types import ASGIApp

from nimu_rt.config import Settings, load_settings

# One scaled time unit for every wait in the tests: generous enough for a
# loaded 2-core CI machine, small enough that a hang fails fast.
WAIT_S = float(os.environ.get("NIMU_TEST_WAIT_S", "10"))

DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def test_database_url() -> str:
    return os.environ.get("NIMU_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


def postgres_required() -> bool:
    return os.environ.get("NIMU_REQUIRE_POSTGRES", "") not in ("", "0")


async def postgres_reachable(url: str) -> str | None:
    """None when PostgreSQL answers at ``url``, else why not."""
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None


def new_schema_name() -> str:
    """A schema of its own for one test, so runs and tests cannot collide."""
    return f"t_{os.getpid()}_{secrets.token_hex(4)}"


async def drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url, timeout=WAIT_S)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def make_settings(
    data_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    database_url: str | None = None,
    schema: str | None = None,
) -> Settings:
    """Settings from config/default.toml with test overrides, ignoring env."""
    merged: dict[str, Any] = {"server": {"data_dir": str(data_dir), "port": 0}}
    if database_url is not None:
        merged["database"] = {"url": database_url, "auto_migrate": True}
        # A cluster shares one secret; the dev key is for the embedded default.
        merged["auth"] = {"jwt_secret": "test-secret-shared-by-the-cluster"}
        if schema is not None:
            merged["database"]["schema_name"] = schema
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return load_settings(env={}, overrides=merged)


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on accepted connections
    # (see nimu_rt/sockets.py).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


@asynccontextmanager
async def serve(app: ASGIApp, **config: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a loopback port; yield its base URL.

    The server runs in this event loop, with its lifespan, and is shut down
    (bounded by WAIT_S) when the block ends.
    """
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", **config)
    )
    # Tests run inside pytest's loop; Ctrl+C must still reach pytest.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(WAIT_S):
            while not server.started:
                if task.done():
                    # uvicorn calls sys.exit() when the lifespan fails.
                    raise RuntimeError("the app failed to start; see the log")
                await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            async with asyncio.timeout(WAIT_S):
                await task
        finally:
            sock.close()
