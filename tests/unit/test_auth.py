"""Token verification: a verified token is remembered only while it is valid."""

from __future__ import annotations

import pytest

from nimu_rt import auth
from nimu_rt.auth import TokenAuthority
from nimu_rt.errors import Unauthorized
from tests.support import make_settings


@pytest.fixture
def authority(tmp_path) -> TokenAuthority:
    settings = make_settings(
        tmp_path, {"auth": {"jwt_secret": "a-test-secret-of-thirty-two-bytes!!"}}
    )
    return TokenAuthority(settings, settings.auth.jwt_secret)


async def test_a_remembered_token_is_refused_once_it_expires(authority, monkeypatch):
    token = authority.issue("alice", ttl_s=60)
    assert (await authority.verify(token)).user_id == "alice"
    # The same token again, now past its expiry plus the allowed clock skew.
    leeway_s = authority.settings.auth.leeway_s
    later = auth._now_s() + 60 + leeway_s + 1
    monkeypatch.setattr(auth, "_now_s", lambda: later)
    with pytest.raises(Unauthorized, match="expired"):
        await authority.verify(token)


async def test_a_remembered_token_is_accepted_within_the_clock_skew(
    authority, monkeypatch
):
    token = authority.issue("alice", role="admin", ttl_s=60)
    assert (await authority.verify(token)).is_operator
    leeway_s = authority.settings.auth.leeway_s
    # Past "exp" but within the leeway: a fresh check accepts it too.
    later = auth._now_s() + 60 + leeway_s / 2
    monkeypatch.setattr(auth, "_now_s", lambda: later)
    principal = await authority.verify(token)
    assert (principal.user_id, principal.role) == ("alice", "admin")


async def test_a_tampered_copy_of_a_remembered_token_is_refused(authority):
    token = authority.issue("alice")
    await authority.verify(token)
    with pytest.raises(Unauthorized):
        await authority.verify(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"))


async def test_the_memory_is_bounded(authority, monkeypatch):
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    tokens = [authority.issue(f"user{i}") for i in range(5)]
    for token in tokens:
        await authority.verify(token)
    assert len(authority._verified) == 3
    # Forgotten tokens are checked afresh, and still pass.
    assert (await authority.verify(tokens[0])).user_id == "user0"
