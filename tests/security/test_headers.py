"""Security headers on every answer, HSTS over https, CORS from config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from nimu_rt.api.ws import uvicorn_options
from nimu_rt.app import Services, create_app
from tests.conftest import Api
from tests.realtime.conftest import ws_url
from tests.support import WAIT_S, make_settings, serve

EXPECTED = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
}
APP_ORIGIN = "https://app.example.test"


@pytest.fixture
def backend() -> str:
    return "sqlite"


def assert_guarded(response: httpx.Response) -> None:
    for name, value in EXPECTED.items():
        assert response.headers.get(name) == value, (name, response.status_code)
    assert "strict-transport-security" not in response.headers
    assert response.headers["x-request-id"]


async def test_every_kind_of_answer_carries_the_headers(api: Api):
    c = api.client
    answers = [
        await c.get("/healthz"),
        await c.get("/no/such/route"),
        await c.get("/api/generations"),  # 401
        await c.post("/api/generations", json={}, headers=api.headers()),  # 422
        await c.get("/static/nimu-client.js"),
        await c.get("/openapi.json"),
    ]
    assert [r.status_code for r in answers] == [200, 404, 401, 422, 200, 200]
    for r in answers:
        assert_guarded(r)


async def test_an_unexpected_error_is_a_500_problem_with_the_headers(
    api: Api, caplog: pytest.LogCaptureFixture
):
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    api.services.generations.list = broken  # type: ignore[method-assign]
    r = await api.client.get(
        "/api/generations", headers={**api.headers(), "X-Request-ID": "req-500"}
    )
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "internal_error"
    assert r.json()["requestId"] == "req-500"
    assert "a bug" not in r.text  # no traceback for the client
    assert_guarded(r)
    errors = [
        rec for rec in caplog.records if rec.__dict__.get("action") == "http.error"
    ]
    assert len(errors) == 1 and errors[0].exc_info is not None


async def test_request_ids_are_taken_when_sane_and_made_otherwise(api: Api):
    r = await api.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await api.client.get("/healthz", headers={"X-Request-ID": "has space"})
    assert r.headers["x-request-id"] not in ("", "has space")


async def test_a_refused_websocket_handshake_carries_the_headers(api: Api):
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            ws_url(api),
            additional_headers={"Origin": "https://evil.example.test"},
            open_timeout=WAIT_S,
        ):
            pass
    response = refused.value.response
    assert response.status_code == 403
    for name, value in EXPECTED.items():
        assert response.headers[name] == value


async def test_hsts_only_over_https(tmp_path: Path):
    settings = make_settings(tmp_path / "data")
    services = Services(settings)
    app = create_app(settings, services=services)
    # As behind a TLS-terminating proxy on this host, which uvicorn trusts
    # for X-Forwarded-Proto.
    options = {**uvicorn_options(settings), "proxy_headers": True}
    async with serve(app, **options) as base_url, httpx.AsyncClient(
        base_url=base_url, timeout=WAIT_S
    ) as http:
        plain = await http.get("/healthz")
        assert "strict-transport-security" not in plain.headers
        secure = await http.get("/healthz", headers={"X-Forwarded-Proto": "https"})
        assert secure.headers["strict-transport-security"] == (
            "max-age=31536000; includeSubDomains"
        )
        refused = await http.get(
            "/api/generations", headers={"X-Forwarded-Proto": "https"}
        )
        assert refused.status_code == 401
        assert "strict-transport-security" in refused.headers


async def test_cors_preflight_and_answers_follow_the_allowlist(
    api_factory: Callable[..., Any],
):
    api = await api_factory({"security": {"cors_origins": [APP_ORIGIN]}})
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key",
    }
    r = await api.client.options(
        "/api/generations", headers={"Origin": APP_ORIGIN, **preflight}
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    allowed = r.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "idempotency-key"} <= set(
        h.strip() for h in allowed.split(",")
    )
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-max-age"] == "600"
    assert_guarded(r)
    # Another origin is refused, and learns nothing it could use.
    r = await api.client.options(
        "/api/generations",
        headers={"Origin": "https://evil.example.test", **preflight},
    )
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
    # A real request from the allowed origin may read the useful headers.
    r = await api.client.post(
        "/api/generations",
        json={"prompt": "A red fox trots through a snowy forest at dawn"},
        headers={"Origin": APP_ORIGIN, **api.headers()},
    )
    assert r.status_code == 201
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = r.headers["access-control-expose-headers"].lower()
    for name in ("etag", "x-request-id", "ratelimit-remaining", "retry-after"):
        assert name in exposed
    assert "access-control-allow-credentials" not in r.headers


async def test_without_an_allowlist_there_is_no_cors(api: Api):
    r = await api.client.options(
        "/api/generations",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
        },
    )
    assert r.status_code == 405
    assert "access-control-allow-origin" not in r.headers
