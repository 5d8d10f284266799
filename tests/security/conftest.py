"""Helpers for the security tests: signing keys, a JWKS server, token makers."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.realtime.conftest import queued_generation
from tests.support import serve

ISSUER = "https://id.example.test/"
AUDIENCE = "nimu-rt-test"
SECRET = "test-secret-shared-by-the-cluster"


@dataclass
class SigningKey:
    """A private key with its kid, and its public half as a JWK."""

    kid: str
    algorithm: str
    private: Any

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid, "RS256", key)

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.algorithm == "RS256" else ECAlgorithm
        doc = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**doc, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(
            claims,
            self.private,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **header},
        )


def claims(
    sub: str = "alice",
    *,
    iss: str | None = ISSUER,
    aud: str | None = AUDIENCE,
    exp_in_s: float = 300,
    nbf_in_s: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    # Whole seconds, as JWTs carry them (and json can encode them).
    now = int(time.time())
    doc: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + exp_in_s, **extra}
    if iss is not None:
        doc["iss"] = iss
    if aud is not None:
        doc["aud"] = aud
    if nbf_in_s is not None:
        doc["nbf"] = now + nbf_in_s
    return doc


@dataclass
class JwksServer:
    """A tiny identity provider: serves whatever keys it holds right now."""

    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    fetches: int = 0

    def app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            self.fetches += 1
            body = {"keys": [key.jwk() for key in self.keys]}
            return Response(json.dumps(body), media_type="application/json")

        return Starlette(routes=[Route("/.well-known/jwks.json", jwks)])


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    """A JWKS over real HTTP on a loopback port, starting with one RSA key."""
    server = JwksServer(keys=[SigningKey.rsa("rsa-1")])
    async with serve(server.app()) as base_url:
        server.url = base_url + "/.well-known/jwks.json"
        yield server


def provider_settings(jwks: JwksServer, **auth: Any) -> dict[str, Any]:
    """Overrides for an app that trusts ``jwks`` (and the HS256 secret)."""
    return {
        "auth": {
            "jwt_secret": SECRET,
            "algorithms": ["HS256", "RS256", "ES256"],
            "jwks_url": jwks.url,
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "leeway_s": 5,
            **auth,
        }
    }


Bearer = Callable[[str], dict[str, str]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def paused_api(api_factory: Callable[..., Any], **overrides: Any) -> Any:
    """An app whose queue holds confirmed generations in ``queued``."""
    api = await api_factory(overrides or None)
    await api.pause_queue()
    return api


async def confirmed(api: Any, user: str = "alice") -> dict[str, Any]:
    """A generation of ``user``, confirmed and waiting in the paused queue."""
    return await queued_generation(api, user)


async def with_video(api: Any, generation_id: str) -> dict[str, Any]:
    """Record a stored video on a generation, as a finished job would."""
    from nimu_rt.models import VideoInfo

    async with api.services.store.transaction() as tx:
        g = await tx.lock_generation(generation_id)
        assert g is not None
        g = await tx.change(
            g,
            video=VideoInfo(
                key=f"videos/{g.user_id}/{g.id}.mp4",
                size_bytes=1234,
                thumbnail_key=f"videos/{g.user_id}/{g.id}.jpg",
            ),
        )
    return {"id": g.id, "seq": g.seq}
