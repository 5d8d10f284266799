"""Structured logs: stable actions, request/user/connection/job ids, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus

from nimu_rt import logs
from nimu_rt.config import LoggingSettings
from tests.ops.test_metrics import FAST, run_generation
from tests.realtime.conftest import open_ws
from tests.security.conftest import bearer


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """What the service writes to its log, as it would in production (JSON)."""
    stream = io.StringIO()
    handler = logs.make_handler(LoggingSettings(format="json"), stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


async def test_tokens_and_secrets_never_reach_the_log(
    api_factory: Callable[..., Any], captured: io.StringIO
):
    api = await api_factory()
    good = api.token("alice")
    secret = api.services.auth._secret
    # A tampered token, an expired one, and one that is not a JWT at all.
    header, payload, signature = good.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    expired = jwt.encode({"sub": "alice", "exp": 1}, secret, algorithm="HS256")
    garbage = "not-a-jwt-but-a-long-credential-value"
    for token in (good, tampered, expired, garbage):
        await api.client.get("/api/generations", headers=bearer(token))
    g = await api.create()
    minted = await api.client.post(
        "/api/tokens", json={"generationIds": [g["id"]]}, headers=bearer(good)
    )
    scoped = minted.json()["token"]
    # Over the WebSocket too: by header, and by auth frames good and bad.
    with pytest.raises(InvalidStatus):
        async with open_ws(api, user=None, additional_headers=bearer(tampered)):
            pass
    async with open_ws(api, user=None) as ws:
        await ws.send(op="auth", token=expired)
        await ws.closed()
    async with open_ws(api, user=None) as ws:
        await ws.send(op="auth", token=scoped)
        await ws.subscribe(f"generation:{g['id']}")
    text = captured.getvalue()
    assert text, "nothing was logged"
    for token in (good, tampered, expired, scoped, garbage, secret):
        assert token not in text
        assert token.split(".")[-1] not in text
    # The refusals were logged, just without what was refused.
    actions = [r.get("action") for r in records(captured)]
    assert "ws.refuse" in actions
    refusals = [r for r in records(captured) if r.get("status") == 401]
    assert len(refusals) == 3


def test_the_formatters_redact_whatever_slips_into_a_message(captured: io.StringIO):
    token = jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256")
    logging.getLogger("nimu_rt.test").warning(
        "upstream said: %s / Authorization: Bearer %s",
        f"bad token {token}",
        "opaque-credential-123",
        extra={"action": "test.redact"},
    )
    text = captured.getvalue()
    assert token not in text and "opaque-credential-123" not in text
    assert records(captured)[-1]["message"].count(logs.REDACTED) == 2


async def test_records_carry_the_ids_of_their_request_connection_and_job(
    api_factory: Callable[..., Any], captured: io.StringIO
):
    api = await api_factory(FAST)
    r = await api.client.post(
        "/api/generations",
        json={"prompt": "A red fox trots through a snowy forest at dawn, cinematic"},
        headers={**api.headers("alice"), "X-Request-ID": "req-create-1"},
    )
    assert r.status_code == 201
    created = [r for r in records(captured) if r.get("action") == "generation.create"]
    assert created[0]["request_id"] == "req-create-1"
    assert created[0]["user_id"] == "alice"
    access = [
        r
        for r in records(captured)
        if r.get("action") == "http.request" and r["request_id"] == "req-create-1"
    ]
    assert access[0]["user_id"] == "alice" and access[0]["status"] == 201

    generation = await run_generation(api)
    found = records(captured)
    # Every record of the service has a stable action.
    ours = [r for r in found if r["logger"].startswith("nimu_rt")]
    assert ours and all(isinstance(r.get("action"), str) for r in ours)
    # Connection records carry the connection id, with its user.
    opened = [r for r in found if r.get("action") == "ws.open"]
    assert opened and opened[-1]["conn_id"] and opened[-1]["user_id"] == "alice"
    # Records logged deep inside the job carry the job's id, though the
    # storage code that logs them knows nothing of jobs; and no request's id.
    stored = [r for r in found if r.get("action") == "storage.video.finalized"]
    assert stored, " ".join(sorted({str(r.get("action")) for r in found}))
    for record in stored:
        assert record["generation_id"] == generation["id"]
        assert record["job_id"]
        assert "request_id" not in record
