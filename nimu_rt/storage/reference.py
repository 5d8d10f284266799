"""Reference images for image-to-video: accepted types and loading one.

A browser uploads the image itself, to a presigned PUT from
``POST /api/storage/uploads`` under ``refs/{userId}/``. Neither R2 nor a
presigned URL looks at what is uploaded, so the bytes are judged here, by
their magic numbers, when a job reads the image to send it to Veo 3.
"""

from __future__ import annotations

from nimu_rt.config import StorageSettings
from nimu_rt.errors import PayloadTooLarge, UnsupportedMediaType
from nimu_rt.storage.base import Storage
from nimu_rt.veo3.client import ImageInput


def sniff_image(head: bytes) -> str | None:
    """The Content-Type of a PNG, JPEG or WebP judged by its first bytes."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


async def load_reference_image(
    storage: Storage, key: str, settings: StorageSettings
) -> ImageInput:
    """Read a reference image for Veo 3, checking its type and size.

    Raises NotFound if the object is missing, PayloadTooLarge above
    ``storage.max_reference_image_bytes`` and UnsupportedMediaType unless
    its bytes are one of ``storage.reference_image_types``. Does not check
    that ``key`` belongs to anyone: generations.py did that when the key was
    accepted.
    """
    limit = settings.max_reference_image_bytes
    try:
        data = await storage.read_bytes(key, max_bytes=limit)
    except PayloadTooLarge:
        raise PayloadTooLarge(
            f"the reference image is larger than {limit} bytes"
        ) from None
    mime_type = sniff_image(data[:16])
    if mime_type is None or mime_type not in settings.reference_image_types:
        raise UnsupportedMediaType(
            "the reference image is not one of "
            + ", ".join(settings.reference_image_types)
        )
    return ImageInput(data=data, mime_type=mime_type)
