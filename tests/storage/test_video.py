"""Video validation, metadata and thumbnails, on real media made with PyAV."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nimu_rt.errors import InvalidVideo
from nimu_rt.storage.base import Storage, StoredObject
from nimu_rt.storage.video import (
    finalize_video,
    probe_video,
    render_thumbnail,
    sniff_video,
    store_video,
)
from tests.storage.conftest import PART, Source, StorageFactory, payload, read_all
from tests.storage.media import decode_jpeg, luma_at, make_video

MP4 = make_video()
WEBM = make_video(container="webm", codec="libvpx")


def frame_shown(luma: int) -> int:
    """Which ramp frame (see media.py) a thumbnail's luma at x=0 belongs to.

    The JPEG is full range and the video limited range, so the ramp's value
    is stretched on the way.
    """
    def full_range(frame: int) -> float:
        return ((20 * frame) % 256 - 16) * 255 / 219

    return min(range(20), key=lambda frame: abs(full_range(frame) - luma))


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x02\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + bytes(32)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (MP4[:64], "video/mp4"),
        (WEBM[:64], "video/webm"),
        (ftyp(b"qt  ", b"qt  "), "video/quicktime"),
        (ftyp(b"mp42", b"isom", b"mp42"), "video/mp4"),
        # An unknown major brand that lists an MP4 brand is still MP4.
        (ftyp(b"xyz1", b"isom"), "video/mp4"),
    ],
)
def test_videos_are_recognised_by_content(head: bytes, expected: str):
    assert sniff_video(head) == expected


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(56), "not a video"),
        (ftyp(b"heic", b"mif1", b"heic"), "image or audio"),
        (ftyp(b"M4A ", b"isom"), "image or audio"),
        (ftyp(b"zzzz", b"zzzz"), "unknown kind"),
        (WEBM[:64].replace(b"webm", b"mkvx"), "Matroska"),
        (b"", "empty"),
        (b"<html><body>Error 403</body></html>", "not a video"),
    ],
)
def test_other_content_is_refused(head: bytes, why: str):
    with pytest.raises(InvalidVideo, match=why) as refused:
        sniff_video(head)
    assert refused.value.problem()["code"] == "invalid_video"
    assert refused.value.status == 422


def test_metadata_of_a_real_mp4_and_webm(tmp_path: Path):
    mp4 = tmp_path / "a.mp4"
    mp4.write_bytes(MP4)
    webm = tmp_path / "a.webm"
    webm.write_bytes(make_video(container="webm", codec="libvpx", audio=False))

    meta = probe_video(mp4)
    assert (meta.width, meta.height, meta.codec) == (160, 90, "h264")
    assert meta.frame_rate == 10.0
    assert meta.has_audio is True
    assert meta.duration_seconds == pytest.approx(2.0, abs=0.05)
    silent = probe_video(webm)
    assert (silent.codec, silent.has_audio) == ("vp8", False)


def test_the_thumbnail_is_the_frame_at_one_second(tmp_path: Path):
    path = tmp_path / "a.mp4"
    path.write_bytes(MP4)

    jpeg = render_thumbnail(path, at_s=1.0, max_width=640)

    assert jpeg[:3] == b"\xff\xd8\xff"
    picture = decode_jpeg(jpeg)
    # Never enlarged past the video's own size.
    assert (picture.width, picture.height) == (160, 90)
    assert frame_shown(luma_at(picture, 0, 45)) == 10


def test_a_short_video_gives_its_middle_frame_scaled_down(tmp_path: Path):
    path = tmp_path / "short.mp4"
    path.write_bytes(make_video(seconds=1, audio=False))

    picture = decode_jpeg(render_thumbnail(path, at_s=1.0, max_width=80))

    assert picture.width == 80
    assert picture.height in (44, 46)
    assert frame_shown(luma_at(picture, 0, 20)) == 5


def test_a_file_with_a_video_header_but_no_video_is_refused(tmp_path: Path):
    path = tmp_path / "fake.mp4"
    path.write_bytes(MP4[:64] + payload(10_000))
    with pytest.raises(InvalidVideo, match="cannot be read|no video stream"):
        probe_video(path)


# -- store_video: the actor's one call -------------------------------------------


async def test_store_video_uploads_measures_and_thumbnails(
    make_storage: StorageFactory, tmp_path: Path
):
    spool = tmp_path / "spool"
    spool.mkdir()
    storage = await make_storage(spool_dir=str(spool))
    source = Source(MP4, chunk_bytes=1000)
    progress: list[int] = []

    info = await store_video(
        storage,
        "videos/alice/g1.mp4",
        source,
        settings=storage.settings,  # type: ignore[attr-defined]
        on_progress=progress.append,
    )

    assert info.key == "videos/alice/g1.mp4"
    assert info.content_type == "video/mp4"
    assert info.size_bytes == len(MP4)
    assert info.sha256 == source.sha256
    assert (info.width, info.height, info.codec, info.frame_rate) == (
        160, 90, "h264", 10.0
    )
    assert info.has_audio is True
    assert info.duration_seconds == pytest.approx(2.0, abs=0.05)
    assert info.thumbnail_key == "videos/alice/g1.jpg"
    assert await read_all(storage, info.key) == MP4
    thumb = await storage.head(info.thumbnail_key)
    assert thumb is not None and thumb.content_type == "image/jpeg"
    picture = decode_jpeg(await read_all(storage, info.thumbnail_key))
    assert frame_shown(luma_at(picture, 0, 45)) == 10
    # The first connection, opened to sniff the type, was the one uploaded.
    assert source.opened_at == [0]
    assert progress[-1] == len(MP4)
    assert list(spool.iterdir()) == []


async def test_store_video_keeps_a_webm_a_webm(make_storage: StorageFactory):
    storage = await make_storage()

    info = await store_video(
        storage,
        "videos/bob/g2.mp4",
        Source(WEBM),
        settings=storage.settings,  # type: ignore[attr-defined]
    )

    assert (info.content_type, info.codec) == ("video/webm", "vp8")
    head = await storage.head("videos/bob/g2.mp4")
    assert head is not None and head.content_type == "video/webm"


async def _nothing_stored(storage: Storage, prefix: str = "videos/") -> None:
    assert [o.key async for o in storage.iter_objects(prefix)] == []
    assert await storage.list_uploads() == []


async def test_store_video_refuses_an_image_before_uploading(
    make_storage: StorageFactory,
):
    storage = await make_storage()
    png = Source(b"\x89PNG\r\n\x1a\n" + payload(PART * 2))

    with pytest.raises(InvalidVideo, match="not a video"):
        await store_video(
            storage, "videos/a/x.mp4", png,
            settings=storage.settings,  # type: ignore[attr-defined]
        )

    await _nothing_stored(storage)


async def test_store_video_refuses_a_video_over_the_limit_while_streaming(
    make_storage: StorageFactory,
):
    # The first parts are already uploaded when the limit is crossed: the
    # upload is aborted and nothing is left.
    storage = await make_storage(max_video_bytes=2 * PART + 10)
    big = Source(MP4[:64] + payload(3 * PART))

    with pytest.raises(InvalidVideo, match="larger than the limit"):
        await store_video(
            storage, "videos/a/big.mp4", big,
            settings=storage.settings,  # type: ignore[attr-defined]
        )

    await _nothing_stored(storage)


async def test_store_video_deletes_a_video_that_does_not_decode(
    make_storage: StorageFactory,
):
    storage = await make_storage()
    fake = Source(MP4[:64] + payload(20_000))

    with pytest.raises(InvalidVideo):
        await store_video(
            storage, "videos/a/fake.mp4", fake,
            settings=storage.settings,  # type: ignore[attr-defined]
        )

    await _nothing_stored(storage)


async def test_finalize_reads_back_a_video_stored_earlier(
    make_storage: StorageFactory, tmp_path: Path
):
    # After a crash between upload and metadata, the actor has the stored
    # object only; on R2 the video is downloaded to a temporary file.
    spool = tmp_path / "spool"
    spool.mkdir()
    storage = await make_storage(spool_dir=str(spool))
    stored = await storage.upload_stream(
        "videos/c/g3.mp4", _once(MP4), content_type="video/mp4"
    )

    info = await finalize_video(
        storage, stored, settings=storage.settings  # type: ignore[attr-defined]
    )

    assert isinstance(stored, StoredObject)
    assert (info.width, info.height, info.thumbnail_key) == (
        160, 90, "videos/c/g3.jpg"
    )
    assert await storage.head("videos/c/g3.jpg") is not None
    assert list(spool.iterdir()) == []


def _once(data: bytes):  # type: ignore[no-untyped-def]
    async def stream(offset: int) -> AsyncIterator[bytes]:
        yield data[offset:]

    return stream
