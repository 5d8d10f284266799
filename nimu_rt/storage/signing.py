"""HMAC-signed, expiring links to the local backend's objects.

The local backend plays the part R2's presigned URLs play in production: a
link names one object, one method and an expiry, and carries an HMAC-SHA256
over exactly those values. Anyone holding the link may use it until it
expires; nobody can change what it grants without the key.

The key is derived from the service's token signing secret (the configured
``auth.jwt_secret`` or the embedded default's dev key), under a label of its
own so that a link signature can never double as a token signature. Rotating
that secret invalidates every outstanding link.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

_LABEL = b"nimu-rt local storage links v1"


def derive_key(secret: str) -> bytes:
    """The link-signing key for the service secret ``secret``."""
    return hmac.new(secret.encode(), _LABEL, hashlib.sha256).digest()


class LinkSigner:
    """Signs and checks the fields of a storage link.

    Does not know about URLs: callers pass the fields (method, key, expiry
    and whatever else the link restricts) in a fixed order.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, *fields: str) -> str:
        """The signature of ``fields``, URL-safe base64 without padding."""
        # Fields are joined with a newline, which no field may contain, so
        # ("a\nb",) and ("a", "b") cannot collide.
        if any("\n" in field for field in fields):
            raise ValueError("a signed field contains a newline")
        mac = hmac.new(self._key, "\n".join(fields).encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    def verify(self, signature: str, *fields: str) -> bool:
        """True when ``signature`` is the signature of ``fields``.

        Compares in constant time. Does not check expiry: see :func:`expired`.
        """
        try:
            expected = self.sign(*fields)
        except ValueError:
            return False
        return hmac.compare_digest(expected.encode(), signature.encode())


def expires_at(ttl_s: int, *, now_s: float | None = None) -> int:
    """The Unix time ``ttl_s`` seconds from now, whole seconds."""
    return int(now_s if now_s is not None else time.time()) + ttl_s


def expired(expiry_s: int, *, now_s: float | None = None) -> bool:
    """True once the Unix time ``expiry_s`` has passed."""
    return (now_s if now_s is not None else time.time()) > expiry_s
