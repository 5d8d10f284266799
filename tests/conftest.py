"""Fixtures shared by every test tier.

PostgreSQL tests read NIMU_TEST_DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/test) and give every test a schema of its
own. Where no server answers they are skipped with the reason, unless
NIMU_REQUIRE_POSTGRES=1 (as in CI), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nimu_rt.api.ws import uvicorn_options
from nimu_rt.app import Services, create_app
from nimu_rt.config import Settings
from nimu_rt.store import Store, create_store
from tests.support import (
    WAIT_S,
    drop_schema,
    make_settings,
    new_schema_name,
    postgres_reachable,
    postgres_required,
    serve,
    test_database_url,
)

_pg_problem: str | None | bool = False  # False: not probed yet


def _postgres_problem() -> str | None:
    global _pg_problem
    if _pg_problem is False:
        _pg_problem = run_beside_loop(postgres_reachable(test_database_url()))
    return _pg_problem  # type: ignore[return-value]


@pytest.fixture
def pg_url() -> str:
    """The test PostgreSQL URL; skips (or fails in CI) when it is down."""
    problem = _postgres_problem()
    if problem is not None:
        message = (
            f"PostgreSQL at {test_database_url()} is not reachable ({problem});"
            " set NIMU_TEST_DATABASE_URL or start the server"
        )
        if postgres_required():
            pytest.fail("NIMU_REQUIRE_POSTGRES is set: " + message)
        pytest.skip("SKIPPED, NO POSTGRES: " + message)
    return test_database_url()


def run_beside_loop(coro: Any) -> Any:
    """Run a coroutine to completion on a thread of its own.

    Sync fixtures may be set up while pytest's event loop is running, where
    asyncio.run() is not allowed.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[str]:
    """A fresh schema name, dropped with its tables after the test."""
    schema = new_schema_name()
    yield schema
    run_beside_loop(drop_schema(pg_url, schema))


SettingsFactory = Callable[..., Settings]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over both store implementations."""
    return request.param


@pytest.fixture
def settings_factory(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> SettingsFactory:
    """Builds Settings for the current backend, with test overrides."""
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")
        schema = request.getfixturevalue("pg_schema")
    else:
        url, schema = None, None

    def factory(overrides: dict[str, Any] | None = None) -> Settings:
        return make_settings(
            tmp_path / "data", overrides, database_url=url, schema=schema
        )

    return factory


@pytest.fixture
async def store(settings_factory: SettingsFactory) -> AsyncIterator[Store]:
    """An open, migrated store of the current backend."""
    s = create_store(settings_factory())
    await s.open()
    await s.migrate()
    try:
        yield s
    finally:
        await s.close()


@dataclass
class Api:
    """A running app on a loopback port, with a client and token helpers."""

    base_url: str
    client: httpx.AsyncClient
    services: Services

    def token(self, user: str = "alice", role: str = "user") -> str:
        return self.services.auth.issue(user, role=role)  # type: ignore[arg-type]

    def headers(self, user: str = "alice", role: str = "user") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, role)}"}

    async def create(self, user: str = "alice", **body: Any) -> dict[str, Any]:
        body.setdefault(
            "prompt",
            "A red fox trots through a snowy forest at dawn, cinematic tracking shot",
        )
        r = await self.client.post(
            "/api/generations", json=body, headers=self.headers(user)
        )
        assert r.status_code == 201, r.text
        return r.json()

    async def pause_queue(self) -> None:
        """Hold confirmed generations in ``queued`` (nothing is dispatched)."""
        r = await self.client.post(
            "/api/queue/pause", headers=self.headers("ops", "admin")
        )
        assert r.status_code == 200, r.text


ApiFactory = Callable[..., Any]


@pytest.fixture
async def api_factory(
    settings_factory: SettingsFactory,
) -> AsyncIterator[Callable[..., Any]]:
    """Starts apps with given setting overrides; all stopped at teardown."""
    stack: list[Any] = []

    async def start(overrides: dict[str, Any] | None = None) -> Api:
        settings = settings_factory(overrides)
        services = Services(settings)
        app = create_app(settings, services=services)
        server = serve(app, **uvicorn_options(settings))
        base_url = await server.__aenter__()
        stack.append(server)
        client = httpx.AsyncClient(base_url=base_url, timeout=WAIT_S)
        stack.append(client)
        return Api(base_url, client, services)

    yield start
    for item in reversed(stack):
        await item.__aexit__(None, None, None)


@pytest.fixture
async def api(api_factory: Callable[..., Any]) -> Api:
    """The app with default test settings, on the current backend."""
    return await api_factory()


# -- S3 (R2 stand-in) ----------------------------------------------------------


@dataclass(frozen=True)
class S3Endpoint:
    """A moto S3 server reached over HTTP, with a fresh bucket for one test."""

    url: str
    bucket: str
    access_key_id: str = "test"
    secret_access_key: str = "test"

    def storage_settings(self, **overrides: Any) -> dict[str, Any]:
        """A ``[storage]`` table for the R2 backend against this endpoint."""
        return {
            "backend": "r2",
            "endpoint_url": self.url,
            "bucket": self.bucket,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            # Fast retries: the tests count tries, they do not wait for them.
            "retry_base_delay_s": 0.001,
            "retry_max_delay_s": 0.01,
            **overrides,
        }


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """One moto S3 server for the session, on a loopback port."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; the tests' own logs matter more.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(moto_url: str) -> Iterator[S3Endpoint]:
    """The moto server with a new, empty bucket; its state is reset after."""
    endpoint = S3Endpoint(url=moto_url, bucket=f"nimu-{secrets.token_hex(6)}")
    with httpx.Client(base_url=moto_url, timeout=WAIT_S) as http:
        # R2's region "auto" needs the matching LocationConstraint on moto.
        body = (
            "<CreateBucketConfiguration><LocationConstraint>auto"
            "</LocationConstraint></CreateBucketConfiguration>"
        )
        http.put(f"/{endpoint.bucket}", content=body).raise_for_status()
        yield endpoint
        # Frees what the test stored (moto keeps objects in memory).
        http.post("/moto-api/reset").raise_for_status()
