"""The /api/storage routes over real HTTP, on both stores."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import pytest

from nimu_rt.errors import UnsupportedMediaType
from nimu_rt.models import VideoInfo
from nimu_rt.storage.keys import video_key
from nimu_rt.storage.reference import load_reference_image
from nimu_rt.storage.video import store_video
from tests.api.test_generations import assert_problem
from tests.conftest import Api, S3Endpoint
from tests.storage.conftest import Source, payload
from tests.storage.media import make_video
from tests.support import WAIT_S

MP4 = make_video()
PNG = b"\x89PNG\r\n\x1a\n" + payload(2000)


async def with_video(api: Api, user: str = "alice") -> tuple[str, VideoInfo]:
    """A generation of ``user`` whose video is stored, as the actor leaves it."""
    generation = await api.create(user=user)
    services = api.services
    key = video_key(services.settings.storage.video_prefix, user, generation["id"])
    info = await store_video(
        services.storage, key, Source(MP4), settings=services.settings.storage
    )
    async with services.store.transaction() as tx:
        locked = await tx.lock_generation(generation["id"])
        assert locked is not None
        await tx.change(locked, video=info)
    return generation["id"], info


def tampered(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    new_query = "&".join(f"{k}={v}" for k, v in query.items())
    return urlunsplit(parts._replace(query=new_query))


async def get_links(api: Api, generation_id: str, user: str = "alice") -> Any:
    r = await api.client.get(
        f"/api/storage/videos/{generation_id}", headers=api.headers(user)
    )
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "private, no-store"
    return r.json()


# -- playback links ------------------------------------------------------------


async def test_the_owner_gets_signed_links_that_play(api: Api):
    gid, info = await with_video(api)

    links = await get_links(api, gid)

    assert links["generationId"] == gid
    assert links["video"]["sha256"] == info.sha256
    assert links["video"]["width"] == 160
    assert links["video"]["durationSeconds"] == pytest.approx(2.0, abs=0.05)
    expires = dt.datetime.fromisoformat(links["expiresAt"])
    ttl_s = api.services.settings.storage.signed_url_ttl_s
    now = dt.datetime.now(dt.UTC)
    assert now < expires <= now + dt.timedelta(seconds=ttl_s + 1)
    # Links are absolute and need no token.
    assert links["url"].startswith(api.base_url + "/api/storage/objects/")
    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        video = await browser.get(links["url"])
        thumb = await browser.get(links["thumbnailUrl"])
    assert video.status_code == 200
    assert video.content == MP4
    assert video.headers["content-type"] == "video/mp4"
    assert video.headers["accept-ranges"] == "bytes"
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize(
    ("asked", "start", "end"),
    [("bytes=100-199", 100, 200), ("bytes=5000-", 5000, None), ("bytes=-10", -10, None),
     ("bytes=0-99999999", 0, None)],
)
async def test_range_requests_let_a_player_seek(
    api: Api, asked: str, start: int, end: int | None
):
    gid, _ = await with_video(api)
    url = (await get_links(api, gid))["url"]

    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        r = await browser.get(url, headers={"Range": asked})

    expected = MP4[start:end]
    first = start % len(MP4)
    assert r.status_code == 206
    assert r.content == expected
    assert r.headers["content-range"] == (
        f"bytes {first}-{first + len(expected) - 1}/{len(MP4)}"
    )
    assert r.headers["content-length"] == str(len(expected))


async def test_range_edge_cases(api: Api):
    gid, _ = await with_video(api)
    url = (await get_links(api, gid))["url"]
    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        past_end = await browser.get(url, headers={"Range": f"bytes={len(MP4)}-"})
        several = await browser.get(url, headers={"Range": "bytes=0-1,5-6"})
        stale = await browser.get(
            url, headers={"Range": "bytes=0-1", "If-Range": '"another-version"'}
        )
        head = await browser.head(url, headers={"Range": "bytes=10-19"})

    doc = assert_problem(past_end, 416, "range_not_satisfiable")
    assert doc["sizeBytes"] == len(MP4)
    assert past_end.headers["content-range"] == f"bytes */{len(MP4)}"
    # Several ranges, or a range of another version: the whole object.
    assert (several.status_code, several.content) == (200, MP4)
    assert (stale.status_code, stale.content) == (200, MP4)
    assert head.status_code == 206
    assert head.headers["content-length"] == "10"
    assert head.content == b""


async def test_expired_and_tampered_links_are_refused(api: Api):
    gid, info = await with_video(api)
    url = (await get_links(api, gid))["url"]
    expired = await api.services.storage.signed_url(info.key, expires_s=-5)
    expired = api.base_url + expired
    other_key = url.replace(".mp4?", ".jpg?")
    later = tampered(url, exp=str(int(dt.datetime.now().timestamp()) + 10**6))
    forged = tampered(url, sig="A" * 43)
    unsigned = url.split("?")[0]

    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        answers = {
            "expired": await browser.get(expired),
            "other key": await browser.get(other_key),
            "later expiry": await browser.get(later),
            "forged": await browser.get(forged),
            "unsigned": await browser.get(unsigned),
        }

    for tried, r in answers.items():
        doc = assert_problem(r, 403, "forbidden")
        expected = "expired" if tried == "expired" else "invalid_signature"
        assert doc["reason"] == expected, tried


async def test_other_users_and_missing_videos_are_not_found(api: Api):
    gid, info = await with_video(api, "alice")
    pending = await api.create(user="alice")

    other = await api.client.get(
        f"/api/storage/videos/{gid}", headers=api.headers("bob")
    )
    delete = await api.client.delete(
        f"/api/storage/videos/{gid}", headers=api.headers("bob")
    )
    no_video = await api.client.get(
        f"/api/storage/videos/{pending['id']}", headers=api.headers("alice")
    )
    no_id = await api.client.get(
        "/api/storage/videos/not-an-id", headers=api.headers("alice")
    )
    anonymous = await api.client.get(f"/api/storage/videos/{gid}")

    assert_problem(other, 404, "not_found")
    assert_problem(delete, 404, "not_found")
    assert "no stored video" in assert_problem(no_video, 404, "not_found")["detail"]
    assert_problem(no_id, 404, "not_found")
    assert_problem(anonymous, 401, "unauthorized")
    # Bob's DELETE touched nothing.
    assert await api.services.storage.head(info.key) is not None


async def test_deleting_keeps_the_generation_and_tells_it(api: Api):
    gid, info = await with_video(api)

    r = await api.client.delete(f"/api/storage/videos/{gid}", headers=api.headers())

    assert r.status_code == 200, r.text
    generation = r.json()
    assert generation["id"] == gid
    assert generation["video"]["key"] == info.key
    deleted_at = generation["video"]["deletedAt"]
    assert deleted_at is not None
    storage = api.services.storage
    assert await storage.head(info.key) is None
    assert info.thumbnail_key and await storage.head(info.thumbnail_key) is None
    events = (
        await api.client.get(f"/api/generations/{gid}/events", headers=api.headers())
    ).json()["items"]
    assert events[-1]["type"] == "updated"
    assert events[-1]["data"]["video"]["deletedAt"] == deleted_at

    again = await api.client.delete(
        f"/api/storage/videos/{gid}", headers=api.headers()
    )
    gone = await api.client.get(f"/api/storage/videos/{gid}", headers=api.headers())

    assert again.status_code == 200
    assert again.json()["seq"] == generation["seq"]  # no second event
    assert assert_problem(gone, 404, "not_found")["deletedAt"] == deleted_at


# -- reference image uploads ---------------------------------------------------------


async def presign(api: Api, user: str = "alice", **body: Any) -> httpx.Response:
    body.setdefault("contentType", "image/png")
    body.setdefault("sizeBytes", len(PNG))
    return await api.client.post(
        "/api/storage/uploads", json=body, headers=api.headers(user)
    )


async def test_a_reference_image_is_uploaded_and_used(api: Api):
    r = await presign(api)
    assert r.status_code == 201, r.text
    upload = r.json()
    assert re.fullmatch(r"refs/alice/[0-9a-f-]{36}\.png", upload["key"])
    assert upload["method"] == "PUT"
    assert upload["headers"] == {"Content-Type": "image/png"}
    assert upload["maxBytes"] == len(PNG)

    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        put = await browser.put(upload["url"], content=PNG, headers=upload["headers"])
    assert put.status_code == 200, put.text

    settings = api.services.settings.storage
    image = await load_reference_image(api.services.storage, upload["key"], settings)
    assert (image.mime_type, image.data) == ("image/png", PNG)
    mine = await api.create(user="alice", referenceImageKey=upload["key"])
    assert mine["options"]["referenceImageKey"] == upload["key"]
    theirs = await api.client.post(
        "/api/generations",
        json={"prompt": "A calm lake at dawn with mist over the water, wide shot",
              "referenceImageKey": upload["key"]},
        headers=api.headers("bob"),
    )
    assert_problem(theirs, 422, "validation_failed")


async def test_bad_upload_requests_are_refused(api: Api):
    too_big = api.services.settings.storage.max_reference_image_bytes + 1
    answers = {
        "a gif": await presign(api, contentType="image/gif"),
        "too big": await presign(api, sizeBytes=too_big),
        "empty": await presign(api, sizeBytes=0),
        "unknown field": await presign(api, filename="x.png"),
    }
    for tried, r in answers.items():
        doc = assert_problem(r, 422, "validation_failed")
        assert doc["errors"], tried
    assert answers["a gif"].json()["errors"][0]["path"] == "$.contentType"
    assert answers["too big"].json()["errors"][0]["path"] == "$.sizeBytes"


async def test_a_presigned_put_accepts_only_what_was_signed(api: Api):
    upload = (await presign(api)).json()
    url = upload["url"]
    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        answers = {
            "other type": await browser.put(
                url, content=PNG, headers={"Content-Type": "image/jpeg"}
            ),
            "other size": await browser.put(
                url, content=PNG + b"x", headers={"Content-Type": "image/png"}
            ),
            "forged": await browser.put(
                tampered(url, max="999999999"),
                content=PNG,
                headers={"Content-Type": "image/png"},
            ),
            "as a download": await browser.get(url),
        }
    for tried, r in answers.items():
        assert_problem(r, 403, "forbidden")
        assert tried
    assert await api.services.storage.head(upload["key"]) is None


async def test_a_non_image_uploaded_as_png_is_refused_when_used(api: Api):
    html = b"<html>" + payload(100)
    upload = (await presign(api, sizeBytes=len(html))).json()
    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        put = await browser.put(upload["url"], content=html, headers=upload["headers"])
    assert put.status_code == 200

    settings = api.services.settings.storage
    with pytest.raises(UnsupportedMediaType, match="not one of"):
        await load_reference_image(api.services.storage, upload["key"], settings)


# -- the R2 backend ----------------------------------------------------------------


async def test_r2_links_are_presigned_and_uploads_go_to_the_bucket(
    api_factory: Any, s3_endpoint: S3Endpoint
):
    api = await api_factory(
        {"storage": s3_endpoint.storage_settings(signed_url_ttl_s=600)}
    )
    gid, _ = await with_video(api)

    links = await get_links(api, gid)
    query = parse_qs(urlsplit(links["url"]).query)
    assert links["url"].startswith(f"{s3_endpoint.url}/{s3_endpoint.bucket}/videos/")
    assert query["X-Amz-Expires"] == ["600"]
    assert "X-Amz-Signature" in query
    upload = (await presign(api)).json()
    assert upload["url"].startswith(f"{s3_endpoint.url}/{s3_endpoint.bucket}/refs/")
    async with httpx.AsyncClient(timeout=WAIT_S) as browser:
        video = await browser.get(links["url"], headers={"Range": "bytes=0-9"})
        put = await browser.put(upload["url"], content=PNG, headers=upload["headers"])
    assert (video.status_code, video.content) == (206, MP4[:10])
    assert put.status_code == 200
    stored = await api.services.storage.head(upload["key"])
    assert stored is not None and stored.content_type == "image/png"


async def test_r2_with_a_public_domain_gives_public_links(
    api_factory: Any, s3_endpoint: S3Endpoint
):
    api = await api_factory(
        {
            "storage": s3_endpoint.storage_settings(
                public_base_url="https://videos.example.com/"
            )
        }
    )
    gid, info = await with_video(api)

    links = await get_links(api, gid)

    assert links["url"] == f"https://videos.example.com/{info.key}"
    assert links["thumbnailUrl"] == f"https://videos.example.com/{info.thumbnail_key}"
    assert links["expiresAt"] is None
