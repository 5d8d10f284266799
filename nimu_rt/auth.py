"""Who is calling: bearer JWT verification, roles, and the dev signing key.

Tokens are verified with PyJWT against the configured algorithm list; a
token's own ``alg`` header only selects among those, so ``none`` or an
algorithm swap can never pass. ``sub`` is the user id. The optional ``role``
claim is ``admin`` or ``service``; both unlock the operator routes, and a
plain user has no role claim.

The embedded default signs with a dev key generated once into the data
directory, so tokens printed by ``nimu-rt serve`` keep working across
restarts.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Literal

import jwt
from msgspec import Struct

from nimu_rt.config import Settings
from nimu_rt.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

Role = Literal["user", "admin", "service"]
ROLES: tuple[Role, ...] = ("user", "admin", "service")
DEV_KEY_FILE = "dev-signing-key"
_USER_ID = re.compile(r"^[\x21-\x2e\x30-\x7e]{1,255}$")


class Principal(Struct, frozen=True, kw_only=True):
    """The verified caller of one request or connection."""

    user_id: str
    role: Role = "user"

    @property
    def is_operator(self) -> bool:
        """Admins and services may use queue, worker and override routes."""
        return self.role in ("admin", "service")

    def may_access(self, owner_id: str) -> bool:
        return self.user_id == owner_id or self.is_operator

    def require_operator(self) -> None:
        if not self.is_operator:
            raise Forbidden("this route needs the admin or service role")


def signing_secret(settings: Settings) -> str:
    """The HS256 secret: configured, or the dev key kept in data_dir."""
    if settings.auth.jwt_secret:
        return settings.auth.jwt_secret
    if not settings.embedded:
        log.warning(
            "auth.jwt_secret is not set; using the dev key in %s, which only"
            " this machine has",
            settings.data_path,
            extra={"action": "auth.dev_key"},
        )
    return load_or_create_dev_key(settings.data_path)


def load_or_create_dev_key(data_dir: Path) -> str:
    """Read the dev key, creating it (mode 0600) on first use.

    Two processes starting at once both end up with the same key: the file
    is created exclusively, and the loser of that race reads the winner's.
    """
    path = data_dir / DEV_KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_urlsafe(48) + "\n")
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise Unauthorized(f"the dev key file {path} is empty; delete it")
    return key


# Tokens remembered as verified, at most; the oldest is forgotten first.
VERIFIED_CACHE_SIZE = 4096


def _now_s() -> float:
    return time.time()


class TokenAuthority:
    """Verifies bearer tokens and issues dev tokens.

    A token that verified is remembered (by its exact text, signature
    included) until it expires, so a tab polling its generation every
    second is not charged a signature check each time: that check cost more
    than the rest of a status read. A remembered token is refused from its
    expiry on, as a fresh check would refuse it. Nothing else about a token
    can change while it is valid (there is no revocation), so remembering
    it does not change who is let in.
    """

    def __init__(self, settings: Settings, secret: str) -> None:
        self.settings = settings
        self._secret = secret
        self._algorithms = list(settings.auth.algorithms)
        # token -> (principal, the time it stops being accepted)
        self._verified: dict[str, tuple[Principal, float]] = {}

    def issue(
        self,
        user_id: str,
        *,
        role: Role = "user",
        ttl_s: int | None = None,
    ) -> str:
        """A signed HS256 token for ``user_id`` (dev and tests)."""
        now = dt.datetime.now(dt.UTC)
        claims: dict[str, object] = {
            "sub": user_id,
            "iat": now,
            "exp": now + dt.timedelta(
                seconds=ttl_s or self.settings.auth.dev_token_ttl_s
            ),
        }
        if role != "user":
            claims["role"] = role
        if self.settings.auth.issuer:
            claims["iss"] = self.settings.auth.issuer
        if self.settings.auth.audience:
            claims["aud"] = self.settings.auth.audience
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; Unauthorized for anything else."""
        auth = self.settings.auth
        remembered = self._verified.get(token)
        if remembered is not None:
            principal, accepted_until = remembered
            if _now_s() < accepted_until:
                return principal
            del self._verified[token]
            raise Unauthorized("the token has expired")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=self._algorithms,
                issuer=auth.issuer or None,
                audience=auth.audience or None,
                leeway=auth.leeway_s,
                options={"require": ["sub", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid: {exc}") from None
        principal = principal_from_claims(claims)
        self._remember(token, principal, float(claims["exp"]) + auth.leeway_s)
        return principal

    def _remember(self, token: str, principal: Principal, until_s: float) -> None:
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            # Dicts keep insertion order: the first key is the oldest.
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, until_s)

    def authenticate(self, authorization: str | None) -> Principal:
        """Verify an ``Authorization: Bearer ...`` header value."""
        if not authorization:
            raise Unauthorized("send Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        return self.verify(token.strip())


def principal_from_claims(claims: dict[str, object]) -> Principal:
    sub = claims.get("sub")
    # User ids become parts of storage keys and topics: no "/", no spaces.
    if not isinstance(sub, str) or not _USER_ID.match(sub):
        raise Unauthorized(
            "the token's sub claim must be 1-255 printable ASCII characters"
            " without '/' or spaces"
        )
    role = claims.get("role", "user")
    if role not in ROLES:
        raise Unauthorized(f"the token's role claim must be one of {', '.join(ROLES)}")
    return Principal(user_id=sub, role=role)  # type: ignore[arg-type]
