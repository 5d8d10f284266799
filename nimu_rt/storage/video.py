"""Videos: accepted by their content, measured with PyAV, given a thumbnail.

The job actor stores a finished Veo 3 video with one call,
:func:`store_video`, which

1. sniffs the first bytes of the download (MP4 and MOV by their ``ftyp``
   box, WebM by its EBML header) and refuses anything else, or anything
   over ``storage.max_video_bytes``, with :class:`InvalidVideo` before or
   while it streams, so a refused download never becomes an object;
2. streams it into storage (:meth:`Storage.upload_stream`: resumable,
   bounded memory) while copying it to a spool file on local disk;
3. reads duration, size, codec, frame rate and audio from that file with
   PyAV, renders a JPEG thumbnail from a frame near 1 s, stores the
   thumbnail beside the video, deletes the spool file, and returns the
   :class:`~nimu_rt.models.VideoInfo` for the generation.

Why a spool file: PyAV needs to seek (an MP4's index is often at its end),
and R2 offers no seekable file. Holding the video in memory would undo the
bounded-memory upload; reading it back from R2 would download it a second
time. The spool costs local disk equal to the video's size while it
uploads. The local backend needs no spool: its object already is a file.

:func:`finalize_video` does steps 3 alone for an object already stored (for
example after a crash between upload and metadata): it downloads the object
to a spool file first when it is not on local disk.

All PyAV work runs in a worker thread. Only the first video stream and the
presence of any audio stream are reported; rotation metadata is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import av
import msgspec

from nimu_rt.config import StorageSettings
from nimu_rt.errors import InvalidVideo
from nimu_rt.models import VideoInfo
from nimu_rt.storage.base import (
    ProgressCallback,
    SourceOpener,
    StateCallback,
    Storage,
    StoredObject,
    UploadState,
)
from nimu_rt.storage.keys import thumbnail_key

log = logging.getLogger(__name__)

ACCEPTED_TYPES = ("video/mp4", "video/quicktime", "video/webm")
# Enough for an ftyp box with a dozen compatible brands, and for the
# DocType of a WebM EBML header.
SNIFF_BYTES = 64
THUMBNAIL_TYPE = "image/jpeg"

# ftyp brands of MP4 and QuickTime video. Image (HEIF, AVIF) and audio-only
# (M4A) files carry an ftyp box too and are refused by brand.
_MP4_BRANDS = {
    b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"iso7", b"iso8",
    b"iso9", b"mp41", b"mp42", b"mp71", b"avc1", b"dash", b"M4V ", b"M4VP",
    b"MSNV", b"f4v ", b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"XAVC", b"NDAS",
}
_QUICKTIME_BRANDS = {b"qt  "}
_NOT_VIDEO_BRANDS = {
    b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1",
    b"avif", b"avis", b"M4A ", b"M4B ", b"M4P ", b"jp2 ", b"crx ",
}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def sniff_video(head: bytes) -> str:
    """The Content-Type of a video judged by its first bytes.

    Raises :class:`InvalidVideo` unless ``head`` starts an MP4, MOV or WebM
    file. Looks at the container only; whether the streams inside decode is
    checked later by :func:`probe_video`.
    """
    if len(head) >= 12 and head[4:8] == b"ftyp":
        box_size = int.from_bytes(head[:4], "big")
        major = head[8:12]
        end = min(len(head), box_size) if box_size >= 16 else 16
        compatible = {head[i : i + 4] for i in range(16, end - 3, 4)}
        if major in _NOT_VIDEO_BRANDS:
            raise InvalidVideo(
                f"this is not a video but an image or audio file (brand"
                f" {major.decode('latin-1').strip()!r})"
            )
        if major in _QUICKTIME_BRANDS:
            return "video/quicktime"
        if major in _MP4_BRANDS or compatible & (_MP4_BRANDS | _QUICKTIME_BRANDS):
            return "video/mp4"
        raise InvalidVideo(
            "an ISO media file of an unknown kind (brand"
            f" {major.decode('latin-1').strip()!r}); send MP4, MOV or WebM"
        )
    if head.startswith(_EBML_MAGIC):
        # The DocType element (id 0x4282) says WebM or Matroska.
        at = head.find(b"\x42\x82")
        if at != -1 and head[at + 3 : at + 7] == b"webm":
            return "video/webm"
        raise InvalidVideo("a Matroska file that is not WebM; send MP4, MOV or WebM")
    if not head:
        raise InvalidVideo("the video is empty")
    raise InvalidVideo("not a video: MP4, MOV or WebM expected")


class VideoMetadata(msgspec.Struct, frozen=True, kw_only=True):
    """What PyAV reads from a video file."""

    duration_seconds: float | None
    width: int
    height: int
    codec: str
    frame_rate: float | None
    has_audio: bool


def probe_video(path: Path) -> VideoMetadata:
    """Read a video file's metadata (blocking: run it in a thread).

    Raises :class:`InvalidVideo` if PyAV cannot open it or it has no video
    stream. Reads the container's headers only, not every frame.
    """
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise InvalidVideo("the file has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context
            duration = None
            if container.duration is not None:
                duration = container.duration / av.time_base
            elif stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            rate = stream.average_rate or stream.guessed_rate
            return VideoMetadata(
                duration_seconds=round(duration, 3) if duration else None,
                width=codec.width,
                height=codec.height,
                codec=codec.name,
                frame_rate=round(float(rate), 3) if rate else None,
                has_audio=bool(container.streams.audio),
            )
    except av.FFmpegError as exc:
        raise InvalidVideo(f"the video cannot be read: {exc}") from None


def render_thumbnail(path: Path, *, at_s: float, max_width: int) -> bytes:
    """A JPEG of the frame at ``at_s`` (blocking: run it in a thread).

    Shorter videos give their middle frame. The image keeps the aspect
    ratio and is at most ``max_width`` wide (never enlarged). Raises
    :class:`InvalidVideo` when no frame decodes.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidVideo("the file has no video stream")
            stream = container.streams.video[0]
            if container.duration is not None:
                at_s = min(at_s, container.duration / av.time_base / 2)
            frame = _frame_at(container, stream, at_s)
    except av.FFmpegError as exc:
        raise InvalidVideo(f"no frame of the video decodes: {exc}") from None
    if frame is None:
        raise InvalidVideo("no frame of the video decodes")
    return _encode_jpeg(frame, max_width)


def _frame_at(container: Any, stream: Any, at_s: float) -> Any:
    if at_s > 0 and stream.time_base is not None:
        # Seeks to the key frame before at_s; decoding walks on from there.
        container.seek(int(at_s / stream.time_base), stream=stream, backward=True)
    chosen = None
    for frame in container.decode(stream):
        chosen = frame
        if frame.time is None or frame.time >= at_s - 1e-6:
            break
    return chosen


def _encode_jpeg(frame: Any, max_width: int) -> bytes:
    width = min(max_width, frame.width)
    # Even sizes: the JPEG is 4:2:0 subsampled.
    height = max(2, round(frame.height * width / frame.width / 2) * 2)
    width = max(2, width // 2 * 2)
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width = width
    encoder.height = height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = fractions.Fraction(1, 25)
    image = frame.reformat(width=width, height=height, format="yuvj420p")
    image.pts = 0
    packets = encoder.encode(image) + encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets)


class VideoSpool:
    """Checks a video download as it passes and, optionally, copies it to disk.

    :meth:`sniff` opens the source once to read its first bytes and decide
    the Content-Type; :meth:`wrap` gives the opener to stream from, which
    reuses that first connection, refuses a stream that does not start like
    a video or grows past ``max_bytes``, and (with ``keep``) writes every
    byte to the spool file at its offset, so a reopened source overwrites
    rather than duplicates. It does not decode anything.
    """

    def __init__(self, *, max_bytes: int, keep: bool, directory: str = "") -> None:
        """``keep``: copy the bytes to a temporary file in ``directory``."""
        self.max_bytes = max_bytes
        self.path: Path | None = None
        self._file: BinaryIO | None = None
        if keep:
            fd, name = tempfile.mkstemp(
                prefix="nimu-video-", suffix=".spool", dir=directory or None
            )
            self.path = Path(name)
            self._file = os.fdopen(fd, "r+b")
        self.content_type: str | None = None
        self._primed: tuple[bytes, AsyncIterator[bytes]] | None = None

    async def sniff(self, open_source: SourceOpener) -> str:
        """Open the source, read its first bytes, return the Content-Type.

        Raises :class:`InvalidVideo` for anything but MP4, MOV and WebM.
        """
        stream = open_source(0)
        head = b""
        try:
            async for chunk in stream:
                head += chunk
                if len(head) >= SNIFF_BYTES:
                    break
            self.content_type = sniff_video(head[:SNIFF_BYTES])
        except BaseException:
            await _close(stream)
            raise
        self._primed = (head, stream)
        return self.content_type

    def wrap(self, open_source: SourceOpener) -> SourceOpener:
        """The opener to upload from: checked, size-limited, spooled."""

        def opener(offset: int) -> AsyncIterator[bytes]:
            return self._stream(open_source, offset)

        return opener

    async def _stream(
        self, open_source: SourceOpener, offset: int
    ) -> AsyncIterator[bytes]:
        if offset == 0 and self._primed is not None:
            head, stream = self._primed
            self._primed = None
        else:
            head, stream = b"", open_source(offset)
        position = offset
        try:
            if offset == 0 and self.content_type is None:
                # Not sniffed beforehand: judge the first chunk(s) here.
                async for chunk in stream:
                    head += chunk
                    if len(head) >= SNIFF_BYTES:
                        break
                self.content_type = sniff_video(head[:SNIFF_BYTES])
            if head:
                position = await self._pass(head, position)
                yield head
            async for chunk in stream:
                position = await self._pass(chunk, position)
                yield chunk
        finally:
            await _close(stream)

    async def _pass(self, chunk: bytes, position: int) -> int:
        end = position + len(chunk)
        if end > self.max_bytes:
            raise InvalidVideo(
                f"the video is larger than the limit of {self.max_bytes} bytes"
            )
        if self._file is not None:
            await asyncio.to_thread(_write_at, self._file, position, chunk)
        return end

    async def aclose(self) -> None:
        """Close an unused first connection and delete the spool file."""
        if self._primed is not None:
            await _close(self._primed[1])
            self._primed = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Make everything written so far readable through :attr:`path`."""
        if self._file is not None:
            self._file.flush()


def _write_at(file: BinaryIO, position: int, chunk: bytes) -> None:
    file.seek(position)
    file.write(chunk)


async def _close(stream: AsyncIterator[bytes]) -> None:
    closer = getattr(stream, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


async def store_video(
    storage: Storage,
    key: str,
    open_source: SourceOpener,
    *,
    settings: StorageSettings,
    state: UploadState | None = None,
    on_state: StateCallback | None = None,
    on_progress: ProgressCallback | None = None,
    generation_id: str | None = None,
) -> VideoInfo:
    """Validate, upload, measure and thumbnail a video (see module doc).

    ``state``, ``on_state`` and ``on_progress`` are passed to
    :meth:`Storage.upload_stream`, so the upload resumes like any other.
    Raises :class:`InvalidVideo` for a refused video (nothing is left
    stored), and the storage errors of the upload otherwise.
    """
    spool = VideoSpool(
        max_bytes=settings.max_video_bytes,
        keep=storage.local_path(key) is None,
        directory=settings.spool_dir,
    )
    try:
        if state is not None:
            # The object's type was fixed when the upload was created; the
            # bytes are still checked as they pass.
            content_type = state.content_type
        else:
            content_type = await spool.sniff(open_source)
        stored = await storage.upload_stream(
            key,
            spool.wrap(open_source),
            content_type=content_type,
            state=state,
            on_state=on_state,
            on_progress=on_progress,
        )
        spool.flush()
        return await finalize_video(
            storage,
            stored,
            settings=settings,
            source_path=spool.path,
            generation_id=generation_id,
        )
    finally:
        await spool.aclose()


async def finalize_video(
    storage: Storage,
    stored: StoredObject,
    *,
    settings: StorageSettings,
    source_path: Path | None = None,
    generation_id: str | None = None,
) -> VideoInfo:
    """Metadata and thumbnail of a stored video; the VideoInfo to record.

    Reads ``source_path`` when given (a copy of the bytes just uploaded),
    else the backend's own file, else downloads the object to a temporary
    file. A file PyAV cannot read as a video raises :class:`InvalidVideo`
    and the object is deleted. A thumbnail that fails to render is logged
    and left out; the video is still accepted.
    """
    ids = {"key": stored.key, "generation_id": generation_id}
    downloaded: Path | None = None
    path = source_path or storage.local_path(stored.key)
    try:
        if path is None:
            downloaded = path = await _download(storage, stored.key, settings)
        try:
            meta = await asyncio.to_thread(probe_video, path)
        except InvalidVideo:
            await storage.delete([stored.key])
            raise
        thumb_key: str | None = thumbnail_key(stored.key)
        try:
            jpeg = await asyncio.to_thread(
                render_thumbnail,
                path,
                at_s=settings.thumbnail_at_s,
                max_width=settings.thumbnail_max_width,
            )
        except InvalidVideo as exc:
            log.warning(
                "no thumbnail for %s: %s",
                stored.key,
                exc.detail,
                extra={"action": "storage.thumbnail_failed", **ids},
            )
            thumb_key = None
        else:
            assert thumb_key is not None
            await storage.put_bytes(thumb_key, jpeg, content_type=THUMBNAIL_TYPE)
    finally:
        if downloaded is not None:
            downloaded.unlink(missing_ok=True)
    log.info(
        "video %s: %sx%s %s, %ss, audio %s",
        stored.key,
        meta.width,
        meta.height,
        meta.codec,
        meta.duration_seconds,
        meta.has_audio,
        extra={"action": "storage.video.finalized", **ids},
    )
    return VideoInfo(
        key=stored.key,
        content_type=stored.content_type,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        duration_seconds=meta.duration_seconds,
        width=meta.width,
        height=meta.height,
        codec=meta.codec,
        frame_rate=meta.frame_rate,
        has_audio=meta.has_audio,
        thumbnail_key=thumb_key,
    )


async def _download(storage: Storage, key: str, settings: StorageSettings) -> Path:
    fd, name = tempfile.mkstemp(
        prefix="nimu-video-", suffix=".spool", dir=settings.spool_dir or None
    )
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in storage.read_stream(key):
                await asyncio.to_thread(out.write, chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def video_keys(video: VideoInfo) -> list[str]:
    """The keys a stored video occupies: the video and its thumbnail."""
    keys = [video.key]
    if video.thumbnail_key:
        keys.append(video.thumbnail_key)
    return keys

