"""Bearer tokens: what the service accepts, and the forgeries it refuses."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from nimu_rt.config import load_settings
from nimu_rt.errors import ConfigError
from tests.conftest import Api
from tests.realtime.conftest import open_ws
from tests.security.conftest import (
    AUDIENCE,
    ISSUER,
    SECRET,
    JwksServer,
    SigningKey,
    bearer,
    claims,
    provider_settings,
)
from tests.support import free_socket

LIST = "/api/generations"


@pytest.fixture
def backend() -> str:
    # Token checks happen before any store access.
    return "sqlite"


@pytest.fixture
async def idp_api(api_factory: Callable[..., Any], jwks_server: JwksServer) -> Api:
    return await api_factory(provider_settings(jwks_server, jwks_min_refresh_s=0))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], key: bytes) -> str:
    """A JWT signed with HMAC-SHA256 over ``key``, whatever the header says."""
    signing_input = (
        b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    )
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


async def refused(api: Api, token: str, detail: str = "") -> dict[str, Any]:
    """The 401 problem for ``token``; its detail contains ``detail``."""
    r = await api.client.get(LIST, headers=bearer(token))
    assert r.status_code == 401, r.text
    problem = r.json()
    assert problem["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert detail.lower() in problem["detail"].lower(), problem["detail"]
    return problem


async def accepted(api: Api, token: str) -> None:
    r = await api.client.get(LIST, headers=bearer(token))
    assert r.status_code == 200, r.text


async def test_tokens_from_the_key_set_pass(idp_api: Api, jwks_server: JwksServer):
    await accepted(idp_api, jwks_server.keys[0].sign(claims()))
    # HS256 with the shared secret is listed too.
    await accepted(idp_api, jwt.encode(claims(), SECRET, algorithm="HS256"))
    # So is ES256, once the provider publishes such a key.
    ec_key = SigningKey.ec("ec-1")
    jwks_server.keys.append(ec_key)
    await accepted(idp_api, ec_key.sign(claims()))


async def test_a_tampered_token_is_refused(idp_api: Api, jwks_server: JwksServer):
    token = jwks_server.keys[0].sign(claims("alice"))
    header, payload, signature = token.split(".")
    # Flip a byte of the signature ...
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[10] ^= 0x01
    await refused(idp_api, f"{header}.{payload}.{b64(bytes(raw))}", "not valid")
    # ... or claim to be someone else under the genuine signature.
    forged = dict(claims("mallory"), iat=0)
    await refused(
        idp_api, f"{header}.{b64(json.dumps(forged).encode())}.{signature}"
    )


async def test_an_unsigned_token_never_passes(idp_api: Api):
    unsigned = jwt.encode(claims(), None, algorithm="none")
    await refused(idp_api, unsigned, "'none' are not accepted")
    # Nor a "none" header on a token that carries some signature anyway.
    await refused(
        idp_api, hand_made({"alg": "none"}, claims(), SECRET.encode()), "'none'"
    )


async def test_hs256_signed_with_the_public_key_is_refused(
    idp_api: Api, jwks_server: JwksServer
):
    # The classic key-type confusion: the provider's public key, which
    # anyone can fetch, used as an HMAC secret with alg HS256.
    key = jwks_server.keys[0]
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    for secret in (key.public_pem(), json.dumps(key.jwk()).encode()):
        await refused(idp_api, hand_made(header, claims(), secret), "not valid")


async def test_hs256_is_refused_where_only_rs256_is_listed(
    api_factory: Callable[..., Any], jwks_server: JwksServer
):
    api = await api_factory(provider_settings(jwks_server, algorithms=["RS256"]))
    key = jwks_server.keys[0]
    await accepted(api, key.sign(claims()))
    for secret in (key.public_pem(), SECRET.encode()):
        await refused(
            api,
            hand_made({"alg": "HS256", "kid": key.kid}, claims(), secret),
            "'HS256' are not accepted",
        )


async def test_a_symmetric_key_from_the_key_set_is_never_used(
    idp_api: Api, jwks_server: JwksServer
):
    # A key set that (by mistake or attack) carries an "oct" key must not
    # become a way to sign HS256 tokens: HS* use the shared secret only.
    secret = b"published-by-mistake"

    class Symmetric(SigningKey):
        def jwk(self) -> dict[str, Any]:
            return {"kty": "oct", "kid": self.kid, "k": b64(secret), "alg": "HS256"}

    jwks_server.keys.append(Symmetric("oct-1", "HS256", None))
    token = hand_made({"alg": "HS256", "kid": "oct-1"}, claims(), secret)
    await refused(idp_api, token, "not valid")


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"iss": "https://evil.example.test/"}, "issuer"),
        ({"iss": None}, "iss"),
        ({"aud": "someone-else"}, "audience"),
        ({"aud": None}, "aud"),
        ({"exp_in_s": -60}, "expired"),
        ({"nbf_in_s": 60}, "not valid yet"),
    ],
    ids=["wrong-issuer", "no-issuer", "wrong-audience", "no-audience", "expired",
         "not-yet-valid"],
)
async def test_claims_are_checked(
    idp_api: Api, jwks_server: JwksServer, changes: dict[str, Any], detail: str
):
    key = jwks_server.keys[0]
    await refused(idp_api, key.sign(claims(**changes)), detail)


async def test_leeway_tolerates_small_clock_skew(
    idp_api: Api, jwks_server: JwksServer
):
    # leeway_s is 5 in these settings.
    key = jwks_server.keys[0]
    await accepted(idp_api, key.sign(claims(exp_in_s=-2)))
    await accepted(idp_api, key.sign(claims(nbf_in_s=2)))


async def test_a_rotated_key_is_fetched_when_first_seen(
    api_factory: Callable[..., Any], jwks_server: JwksServer
):
    api = await api_factory(provider_settings(jwks_server, jwks_min_refresh_s=0))
    old = jwks_server.keys[0]
    await accepted(api, old.sign(claims()))
    assert jwks_server.fetches == 1
    await accepted(api, old.sign(claims()))
    assert jwks_server.fetches == 1  # cached
    # The provider rotates: a new kid, the old key withdrawn.
    new = SigningKey.rsa("rsa-2")
    jwks_server.keys = [new]
    await accepted(api, new.sign(claims()))
    assert jwks_server.fetches == 2
    # The withdrawn key is gone with the refresh.
    await refused(api, old.sign(claims()), "signing key")


async def test_unknown_kids_cannot_force_a_fetch_per_request(
    api_factory: Callable[..., Any], jwks_server: JwksServer
):
    api = await api_factory(provider_settings(jwks_server, jwks_min_refresh_s=60))
    await accepted(api, jwks_server.keys[0].sign(claims()))
    assert jwks_server.fetches == 1
    stranger = SigningKey.rsa("made-up")
    for n in range(5):
        stranger.kid = f"made-up-{n}"
        await refused(api, stranger.sign(claims()), "signing key (kid)")
    assert jwks_server.fetches == 1


async def test_concurrent_lookups_share_one_fetch(
    api_factory: Callable[..., Any], jwks_server: JwksServer
):
    api = await api_factory(provider_settings(jwks_server, jwks_min_refresh_s=0))
    token = jwks_server.keys[0].sign(claims())
    answers = await asyncio.gather(
        *(api.client.get(LIST, headers=bearer(token)) for _ in range(10))
    )
    assert [r.status_code for r in answers] == [200] * 10
    assert jwks_server.fetches == 1


async def test_an_unreachable_key_set_is_503_not_401(
    api_factory: Callable[..., Any], jwks_server: JwksServer
):
    with free_socket() as closed:
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/jwks.json"
    settings = provider_settings(jwks_server)
    settings["auth"]["jwks_url"] = dead_url
    api = await api_factory(settings)
    r = await api.client.get(
        LIST, headers=bearer(jwks_server.keys[0].sign(claims()))
    )
    # The token may be fine: the client should keep it and try later.
    assert (r.status_code, r.json()["code"]) == (503, "unavailable")
    # HS256 tokens do not need the key set.
    await accepted(api, jwt.encode(claims(), SECRET, algorithm="HS256"))


async def test_roles_come_from_verified_provider_tokens(
    idp_api: Api, jwks_server: JwksServer
):
    key = jwks_server.keys[0]
    r = await idp_api.client.get(
        "/api/queue", headers=bearer(key.sign(claims("ops", role="admin")))
    )
    assert r.status_code == 200
    r = await idp_api.client.get(
        "/api/queue", headers=bearer(key.sign(claims("ops", role="root")))
    )
    assert r.status_code == 401 and "role" in r.json()["detail"]


async def test_websocket_auth_frames_use_the_same_checks(
    idp_api: Api, jwks_server: JwksServer
):
    key = jwks_server.keys[0]
    async with open_ws(idp_api, user=None) as ws:
        await ws.send(op="auth", token=key.sign(claims()))
        assert (await ws.subscribe("user:alice"))["op"] == "subscribed"
    async with open_ws(idp_api, user=None) as ws:
        await ws.send(op="auth", token=key.sign(claims(aud="someone-else")))
        frame = await ws.recv()
        assert (frame["op"], frame["code"]) == ("error", "unauthorized")
        assert (await ws.closed())[0] == 4501


def test_settings_refuse_none_and_asymmetric_keys_without_a_key_set():
    with pytest.raises(ConfigError, match="auth: algorithms must be"):
        load_settings(env={}, overrides={"auth": {"algorithms": ["HS256", "none"]}})
    with pytest.raises(ConfigError, match="jwks_url is required"):
        load_settings(env={}, overrides={"auth": {"algorithms": ["RS256"]}})
    settings = load_settings(
        env={},
        overrides={
            "auth": {"algorithms": ["ES256"], "jwks_url": "https://id/jwks.json"}
        },
    )
    assert settings.auth.algorithms == ["ES256"]
    assert ISSUER and AUDIENCE  # used by the fixtures above
