"""The identity provider's public keys, fetched from its JWKS URL and cached.

Tokens signed with RS*, ES* or PS* name their key with a ``kid`` header.
:class:`JwksCache` answers "which key is that?" from memory, and fetches the
key set again when

- it is older than ``auth.jwks_cache_s`` (providers rotate keys), or
- a token names a ``kid`` the cache does not hold (a rotation happened
  since the last fetch),

but never more often than ``auth.jwks_min_refresh_s``: anyone can send
tokens with made-up kids, and each must not cost a request to the provider.
Concurrent lookups share one fetch. A failed fetch keeps the keys already
held; a token whose key cannot be had at all is answered 503 (the provider
is unreachable) rather than 401 (the token is bad), so clients keep it.

Symmetric keys (``kty: oct``) and encryption keys (``use: enc``) in the set
are ignored: the shared secret never comes from the network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt
import msgspec

from nimu_rt.errors import Unauthorized, Unavailable

log = logging.getLogger(__name__)

# A key set is a few KiB; a larger answer is not one.
MAX_JWKS_BYTES = 1024 * 1024


class JwksCache:
    """The keys of one JWKS URL, cached and refreshed as the module says.

    Not a general HTTP cache: Cache-Control headers of the answer are not
    read; the settings decide. Call :meth:`aclose` when done.
    """

    def __init__(
        self,
        url: str,
        *,
        cache_s: float,
        min_refresh_s: float,
        timeout_s: float,
    ) -> None:
        self.url = url
        self.cache_s = cache_s
        self.min_refresh_s = min_refresh_s
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._keys: dict[str | None, dict[str, Any]] = {}
        # Parsed keys by (kid, algorithm); parsing an RSA key per request
        # would cost more than verifying with it.
        self._parsed: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        # Fetches finished (or failed); a lookup that waited for the lock
        # while one finished has nothing left to fetch.
        self._completed = 0
        # Fetches made, for operators and tests.
        self.fetches = 0

    async def aclose(self) -> None:
        """Close the HTTP client; safe to call twice."""
        await self._http.aclose()

    async def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key ``kid`` names, bound to ``algorithm``.

        Raises Unauthorized when the set has no such key (or its type does
        not fit the algorithm), Unavailable when no key set could ever be
        fetched.
        """
        if self._stale() or (kid not in self._keys and self._may_refresh()):
            await self._refresh()
        if self._fetched_at is None:
            raise Unavailable("the identity provider's signing keys cannot be fetched")
        parsed = self._parsed.get((kid, algorithm))
        if parsed is not None:
            return parsed
        jwk = self._keys.get(kid)
        if jwk is None and kid is None and len(self._keys) == 1:
            # A token without kid is unambiguous when the set has one key.
            jwk = next(iter(self._keys.values()))
        if jwk is None:
            raise Unauthorized("the token's signing key (kid) is not known")
        try:
            # The key's own "alg" wins: a token naming another algorithm is
            # then refused by PyJWT.
            parsed = jwt.PyJWK(jwk, algorithm=jwk.get("alg") or algorithm)
        except (jwt.PyJWKError, jwt.InvalidKeyError) as exc:
            raise Unauthorized(
                f"the token's signing key does not fit {algorithm}: {exc}"
            ) from None
        self._parsed[(kid, algorithm)] = parsed
        return parsed

    def _stale(self) -> bool:
        return (
            self._fetched_at is None
            or time.monotonic() - self._fetched_at >= self.cache_s
        ) and self._may_refresh()

    def _may_refresh(self) -> bool:
        return (
            self._attempted_at is None
            or time.monotonic() - self._attempted_at >= self.min_refresh_s
        )

    async def _refresh(self) -> None:
        completed = self._completed
        async with self._lock:
            if self._completed != completed:
                return  # another lookup fetched while this one waited
            self._attempted_at = time.monotonic()
            self.fetches += 1
            try:
                keys = await self._fetch()
            except (httpx.HTTPError, ValueError) as exc:
                # Logged once per attempt, and attempts are rate-limited.
                log.warning(
                    "cannot fetch the JWKS from %s: %s",
                    self.url,
                    exc,
                    extra={"action": "auth.jwks_error"},
                )
                return
            finally:
                self._completed += 1
            self._keys = keys
            self._parsed = {}
            self._fetched_at = time.monotonic()
            log.info(
                "fetched %d signing keys from %s",
                len(keys),
                self.url,
                extra={"action": "auth.jwks_fetch"},
            )

    async def _fetch(self) -> dict[str | None, dict[str, Any]]:
        async with self._http.stream("GET", self.url) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the key set is over {MAX_JWKS_BYTES} bytes")
        try:
            doc = msgspec.json.decode(bytes(body))
        except msgspec.DecodeError as exc:
            raise ValueError(f"the key set is not JSON: {exc}") from None
        found = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(found, list):
            raise ValueError("the key set has no 'keys' list")
        keys: dict[str | None, dict[str, Any]] = {}
        for jwk in found:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            if jwk.get("kty") not in ("RSA", "EC", "OKP"):
                continue
            kid = jwk.get("kid")
            keys[kid if isinstance(kid, str) else None] = jwk
        return keys
