"""Who is calling: bearer JWT verification, roles, scopes, the dev signing key.

Tokens are verified with PyJWT against the configured algorithm list; a
token's own ``alg`` header only selects among those, so ``none`` or an
algorithm swap can never pass. HS* tokens are checked with the shared
secret only and RS*/ES*/PS* tokens with keys from the JWKS URL only, so a
token "signed" with the provider's public key as an HMAC secret fails.
``sub`` is the user id. The optional ``role`` claim is ``admin`` or
``service``; both unlock the operator routes, and a plain user has no role
claim. Scoped read tokens (``POST /api/tokens``) are described on
:class:`TokenAuthority`.

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
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jwt
import msgspec
from msgspec import Struct

from nimu_rt.config import Settings
from nimu_rt.errors import Forbidden, ScopeDenied, Unauthorized
from nimu_rt.jwks import JwksCache

log = logging.getLogger(__name__)

Role = Literal["user", "admin", "service"]
ROLES: tuple[Role, ...] = ("user", "admin", "service")
DEV_KEY_FILE = "dev-signing-key"
_USER_ID = re.compile(r"^[\x21-\x2e\x30-\x7e]{1,255}$")
# The issuer of scoped read tokens minted by this service.
SCOPED_ISSUER = "nimu-rt:scoped"


class Principal(Struct, frozen=True, kw_only=True):
    """The verified caller of one request or connection.

    ``scopes`` is None for a full token. A scoped read token (minted by
    ``POST /api/tokens``) carries the topics it may read, e.g.
    ``{"generation:<id>", "user:<id>"}``, and nothing else: no role, no
    writes, no other reads.
    """

    user_id: str
    role: Role = "user"
    scopes: frozenset[str] | None = None

    @property
    def is_operator(self) -> bool:
        """Admins and services may use queue, worker and override routes."""
        return self.role in ("admin", "service") and self.scopes is None

    def may_access(self, owner_id: str) -> bool:
        """The ownership rule: a user's own things, or anything for operators.

        Every route and topic asks this one question; a scoped token is
        narrowed further by :meth:`allows_topic`.
        """
        return self.user_id == owner_id or self.is_operator

    def allows_topic(self, topic: str) -> bool:
        """Whether this token's scope covers ``topic`` (full tokens: all).

        Ownership is a separate check: a scope only ever narrows.
        """
        return self.scopes is None or topic in self.scopes

    def require_full(self) -> None:
        """Refuse a scoped token (403 scope_denied)."""
        if self.scopes is not None:
            raise ScopeDenied(
                "this token may only read the generations and topics it was"
                " minted for",
                scopes=sorted(self.scopes),
            )

    def require_operator(self) -> None:
        self.require_full()
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

    Two processes starting at once end up with the same key: the key is
    written to a file of its own and then linked into place, which succeeds
    for one process only; the other reads the winner's complete file.
    """
    path = data_dir / DEV_KEY_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd, draft = tempfile.mkstemp(prefix=".dev-key-", dir=data_dir)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_urlsafe(48) + "\n")
            try:
                os.link(draft, path)  # atomic; fails if the key exists
            except FileExistsError:
                pass
        finally:
            os.unlink(draft)
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise Unauthorized(f"the dev key file {path} is empty; delete it")
    return key


# Tokens remembered as verified, at most; the oldest is forgotten first.
VERIFIED_CACHE_SIZE = 4096


def _now_s() -> float:
    return time.time()


class _Verified(NamedTuple):
    """A token that verified, remembered until ``until_s`` (epoch seconds)."""

    principal: Principal
    until_s: float
    # The provider's key that verified it; None for the shared secret, which
    # cannot change while the process runs.
    key: Any
    kid_alg: tuple[str | None, str]


class TokenAuthority:
    """Verifies bearer tokens; issues dev tokens and scoped read tokens.

    Two kinds of tokens are accepted:

    - full tokens from the identity provider (or ``nimu-rt token``): signed
      with one of ``auth.algorithms``, HS* with the shared secret and the
      others with a key from ``auth.jwks_url``; ``iss`` and ``aud`` checked
      when configured;
    - scoped read tokens minted here (``iss`` is :data:`SCOPED_ISSUER`):
      always HS256 with the shared secret, always with a ``scope`` claim,
      never with a role.

    The unverified header and issuer only choose which of the two checks
    runs; the chosen check then verifies everything, so lying about either
    gains nothing.
    """

    def __init__(
        self, settings: Settings, secret: str, *, jwks: JwksCache | None = None
    ) -> None:
        self.settings = settings
        self._secret = secret
        self._algorithms = list(settings.auth.algorithms)
        auth = settings.auth
        if jwks is None and auth.jwks_url:
            jwks = JwksCache(
                auth.jwks_url,
                cache_s=auth.jwks_cache_s,
                min_refresh_s=auth.jwks_min_refresh_s,
                timeout_s=auth.jwks_timeout_s,
            )
        self.jwks = jwks
        # Tokens that verified, by their exact text.
        self._verified: dict[str, _Verified] = {}

    async def aclose(self) -> None:
        """Close the JWKS client; safe to call twice."""
        if self.jwks is not None:
            await self.jwks.aclose()

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

    def mint_scoped(
        self, user_id: str, scopes: set[str], ttl_s: int
    ) -> tuple[str, dt.datetime]:
        """A scoped read token for ``user_id``, and when it expires.

        Does not check that the user owns what the scopes name: the caller
        does (see :mod:`nimu_rt.api.tokens`).
        """
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        expires_at = now + dt.timedelta(seconds=ttl_s)
        claims = {
            "iss": SCOPED_ISSUER,
            "aud": self._scoped_audience,
            "sub": user_id,
            "scope": " ".join(sorted(scopes)),
            "iat": now,
            "exp": expires_at,
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256"), expires_at

    @property
    def _scoped_audience(self) -> str:
        return self.settings.auth.audience or SCOPED_ISSUER

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; Unauthorized for anything else.

        May fetch the JWKS (bounded by ``auth.jwks_timeout_s``), which is
        why it is a coroutine. A token that verified is remembered (by its
        exact text, signature included) until it expires, so a tab polling
        every second is not charged a signature check each time: that check
        cost more than the rest of a status read. Nothing about a token can
        change while it is valid (there is no revocation) except the
        provider's key set, which is consulted on each use of a remembered
        provider token; so remembering does not change who is let in.
        """
        remembered = self._verified.get(token)
        if remembered is not None:
            if _now_s() >= remembered.until_s:
                del self._verified[token]
                raise Unauthorized("the token has expired")
            if remembered.key is None or await self._same_key(remembered):
                return remembered.principal
            # The provider's key set changed since: check the token afresh,
            # so that a withdrawn key stops working.
            del self._verified[token]
        fresh = await self._verify_afresh(token)
        self._remember(token, fresh)
        return fresh.principal

    async def _same_key(self, remembered: _Verified) -> bool:
        assert self.jwks is not None and remembered.key is not None
        kid, alg = remembered.kid_alg
        try:
            # Cheap while the set is cached; refetches it when it is due.
            return await self.jwks.key(kid, alg) is remembered.key
        except Unauthorized:
            return False

    async def _verify_afresh(self, token: str) -> _Verified:
        """The principal of a valid token, and how long it stays valid."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not a JWT: {exc}") from None
        if unverified.get("iss") == SCOPED_ISSUER:
            return self._verify_scoped(token)
        alg = header.get("alg")
        if alg not in self._algorithms:
            # "none" and anything unlisted end here, whatever the token says.
            raise Unauthorized(
                f"tokens signed with {alg!r} are not accepted; accepted:"
                f" {', '.join(self._algorithms)}"
            )
        key: Any
        kid = header.get("kid")
        kid = kid if isinstance(kid, str) else None
        if alg.startswith("HS"):
            key = self._secret
        elif self.jwks is None:
            raise Unauthorized("no key set is configured for this algorithm")
        else:
            key = await self.jwks.key(kid, alg)
        auth = self.settings.auth
        claims = self._decode(
            token,
            key,
            algorithms=[alg],
            issuer=auth.issuer or None,
            audience=auth.audience or None,
            require=["sub", "exp"],
        )
        return _Verified(
            principal_from_claims(claims),
            self._until_s(claims),
            None if alg.startswith("HS") else key,
            (kid, alg),
        )

    def _until_s(self, claims: dict[str, Any]) -> float:
        return float(claims["exp"]) + self.settings.auth.leeway_s

    def _verify_scoped(self, token: str) -> _Verified:
        claims = self._decode(
            token,
            self._secret,
            algorithms=["HS256"],
            issuer=SCOPED_ISSUER,
            audience=self._scoped_audience,
            require=["sub", "exp", "scope"],
        )
        if "role" in claims:
            raise Unauthorized("a scoped token cannot carry a role")
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.split():
            raise Unauthorized("the token's scope claim is empty")
        principal = principal_from_claims(claims)
        scoped = msgspec.structs.replace(principal, scopes=frozenset(scope.split()))
        return _Verified(scoped, self._until_s(claims), None, (None, "HS256"))

    def _decode(
        self,
        token: str,
        key: Any,
        *,
        algorithms: list[str],
        issuer: str | None,
        audience: str | None,
        require: list[str],
    ) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=issuer,
                audience=audience,
                leeway=self.settings.auth.leeway_s,
                options={"require": require},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"the token is not valid: {exc}") from None

    def _remember(self, token: str, verified: _Verified) -> None:
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            # Dicts keep insertion order: the first key is the oldest.
            del self._verified[next(iter(self._verified))]
        self._verified[token] = verified

    async def authenticate(self, authorization: str | None) -> Principal:
        """Verify an ``Authorization: Bearer ...`` header value."""
        if not authorization:
            raise Unauthorized("send Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        return await self.verify(token.strip())


def principal_from_claims(claims: dict[str, object]) -> Principal:
    """The caller named by verified claims; Unauthorized if they name none."""
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
