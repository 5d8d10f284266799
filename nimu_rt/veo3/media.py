"""Real, playable MP4 files made with PyAV, for the Veo 3 simulator.

:func:`render_mp4` encodes H.264 at 24 fps (Veo 3's rate) with an optional
AAC track, moov atom first so a player can start before the end. Results
are cached by their parameters: tests ask for the same few tiny videos over
and over. :class:`PaddedVideo` serves such a file grown to any size by a
trailing ``free`` box (which MP4 readers skip), without holding the padding
in memory, for tests of very large downloads.

The pictures are a flat colour changing over time and the sound a sine
tone: enough to decode and measure, nothing to look at.
"""

from __future__ import annotations

import array
import functools
import math
import os
import tempfile
from collections.abc import Iterator

import av

FRAME_RATE = 24
AUDIO_RATE_HZ = 24000
_AUDIO_FRAME_SAMPLES = 1024
_SHORT_SIDE_PX = {"720p": 720, "1080p": 1080, "4k": 2160}
# Padding is produced from this block, never allocated at full size.
_ZEROS = bytes(256 * 1024)


def frame_size(
    aspect_ratio: str, resolution: str, short_side_px: int
) -> tuple[int, int]:
    """Width and height for a video: ``short_side_px`` on the short side, or
    the resolution's real size when it is 0. Both even (H.264 4:2:0)."""
    short = short_side_px or _SHORT_SIDE_PX.get(resolution, 720)
    short = max(16, short - short % 2)
    long = round(short * 16 / 9)
    long -= long % 2
    return (short, long) if aspect_ratio == "9:16" else (long, short)


@functools.lru_cache(maxsize=32)
def render_mp4(width: int, height: int, duration_s: int, audio: bool) -> bytes:
    """An MP4 of ``duration_s`` seconds, H.264 24 fps, AAC mono when ``audio``.

    CPU-bound (run it in a thread); cached, so a repeated request is free.
    Writes through a temporary file because the faststart pass re-reads it.
    """
    fd, path = tempfile.mkstemp(suffix=".mp4", prefix="nimu-sim-")
    os.close(fd)
    try:
        with av.open(
            path, mode="w", format="mp4", options={"movflags": "+faststart"}
        ) as container:
            # Every stream must exist before the first packet is muxed.
            video = container.add_stream(
                "libx264", rate=FRAME_RATE, options={"preset": "ultrafast"}
            )
            video.width = width
            video.height = height
            video.pix_fmt = "yuv420p"
            sound = (
                container.add_stream("aac", rate=AUDIO_RATE_HZ, layout="mono")
                if audio
                else None
            )
            _encode_video(container, video, duration_s)
            if sound is not None:
                _encode_audio(container, sound, duration_s)
        with open(path, "rb") as file:
            return file.read()
    finally:
        os.unlink(path)


def _encode_video(
    container: av.container.OutputContainer,
    stream: av.VideoStream,
    duration_s: int,
) -> None:
    for index in range(FRAME_RATE * duration_s):
        frame = av.VideoFrame(stream.width, stream.height, "yuv420p")
        luma = 16 + (index * 5) % 220
        for number, plane in enumerate(frame.planes):
            value = luma if number == 0 else 128 + (index % 48) - 24
            plane.update(bytes([value]) * plane.buffer_size)
        frame.pts = index
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _encode_audio(
    container: av.container.OutputContainer, stream: av.AudioStream, duration_s: int
) -> None:
    total = AUDIO_RATE_HZ * duration_s
    step = 2 * math.pi * 440 / AUDIO_RATE_HZ
    done = 0
    while done < total:
        count = min(_AUDIO_FRAME_SAMPLES, total - done)
        frame = av.AudioFrame(format="fltp", layout="mono", samples=count)
        samples = array.array(
            "f", (0.2 * math.sin(step * (done + i)) for i in range(count))
        )
        frame.planes[0].update(samples.tobytes())
        frame.sample_rate = AUDIO_RATE_HZ
        frame.pts = done
        done += count
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


class PaddedVideo:
    """An MP4 followed by a ``free`` box so that the whole is ``size_bytes``.

    Asking for less than the MP4 plus an 8-byte box header gives the MP4
    unchanged. Only the MP4 itself is held in memory.
    """

    def __init__(self, mp4: bytes, size_bytes: int | None = None) -> None:
        padding = 0 if size_bytes is None else size_bytes - len(mp4)
        if padding < 8:
            header = b""
            self._zeros = 0
        elif padding < 2**32:
            header = padding.to_bytes(4, "big") + b"free"
            self._zeros = padding - 8
        else:
            # Boxes of 4 GiB and more use the 64-bit "largesize" field.
            header = (1).to_bytes(4, "big") + b"free" + padding.to_bytes(8, "big")
            self._zeros = padding - 16
        self._head = mp4 + header
        self.size_bytes = len(self._head) + self._zeros

    def iter_range(
        self, start: int, end: int, chunk_bytes: int = len(_ZEROS)
    ) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive), in chunks of at most
        ``chunk_bytes`` (itself at most 256 KiB)."""
        chunk_bytes = min(chunk_bytes, len(_ZEROS))
        position = start
        head = self._head
        while position < end:
            if position < len(head):
                stop = min(end, len(head), position + chunk_bytes)
                yield head[position:stop]
            else:
                stop = min(end, position + chunk_bytes)
                yield _ZEROS[: stop - position]
            position = stop
