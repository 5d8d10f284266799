"""Tiny real videos made with PyAV, for tests that need decodable media.

Frame ``i`` has a luma ramp ``(2x + 20i) mod 256`` across its width, so a
decoded frame tells which frame it was: at x = 0 its luma is ``20i``.
"""

from __future__ import annotations

import io

import av


def make_video(
    *,
    container: str = "mp4",
    codec: str = "libx264",
    seconds: int = 2,
    fps: int = 10,
    width: int = 160,
    height: int = 90,
    audio: bool = True,
) -> bytes:
    """Encode a short video with a ramp picture and (optionally) silence."""
    out = io.BytesIO()
    with av.open(out, "w", format=container) as muxer:
        video = muxer.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            video.options = {"preset": "ultrafast"}
        sound = None
        if audio:
            sound = muxer.add_stream("aac" if container == "mp4" else "libopus",
                                     rate=48000)
            sound.layout = "mono"
        chroma = (width // 2) * (height // 2)
        for i in range(seconds * fps):
            frame = av.VideoFrame(width, height, "yuv420p")
            frame.planes[0].update(
                bytes((2 * x + 20 * i) % 256 for x in range(width)) * height
            )
            frame.planes[1].update(bytes([128]) * chroma)
            frame.planes[2].update(bytes([128]) * chroma)
            frame.pts = i
            for packet in video.encode(frame):
                muxer.mux(packet)
        for packet in video.encode(None):
            muxer.mux(packet)
        if sound is not None:
            size = sound.codec_context.frame_size or 960
            for start in range(0, 48000 * seconds, size):
                chunk = av.AudioFrame(format="fltp", layout="mono", samples=size)
                chunk.planes[0].update(bytes(4 * size))
                chunk.sample_rate = 48000
                chunk.pts = start
                for packet in sound.encode(chunk):
                    muxer.mux(packet)
            for packet in sound.encode(None):
                muxer.mux(packet)
    return out.getvalue()


def decode_jpeg(data: bytes) -> av.VideoFrame:
    """The picture of a JPEG file, decoded with PyAV."""
    with av.open(io.BytesIO(data), format="image2pipe") as image:
        return next(image.decode(video=0))


def luma_at(frame: av.VideoFrame, x: int, y: int) -> int:
    """The Y value of one pixel of a decoded frame."""
    gray = frame.reformat(format="gray")
    plane = gray.planes[0]
    return bytes(plane)[y * plane.line_size + x]
