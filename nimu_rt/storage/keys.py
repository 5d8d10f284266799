"""Object keys: which keys are valid, and where videos and images are kept.

Layout of a bucket::

    {video_prefix}{userId}/{generationId}.mp4    the video
    {video_prefix}{userId}/{generationId}.jpg    its thumbnail, beside it
    refs/{userId}/{uuid}.{png|jpg|webp}          reference images (uploads)

Keys group by user so that everything of one person can be listed (or
removed) by prefix. The same key rules apply to every backend, so that a key
valid on the local backend is valid on R2 and the other way round.
"""

from __future__ import annotations

import uuid

from nimu_rt.errors import StorageError

# generations.py accepts only referenceImageKey values under
# f"{REFERENCE_PREFIX}{userId}/"; a test keeps the two equal.
REFERENCE_PREFIX = "refs/"
MAX_KEY_BYTES = 1024  # R2's limit
REFERENCE_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key; raise StorageError if not.

    Valid: 1-1024 bytes of printable ASCII without spaces, "/"-separated
    segments none of which is empty, "." or "..". The last rule keeps a key
    from escaping the local backend's directory and from being rewritten by
    URL normalisation. It does not check that the object exists.
    """
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise StorageError(f"invalid storage key {key!r}: must be 1-1024 bytes")
    if not all("\x21" <= ch <= "\x7e" for ch in key):
        raise StorageError(
            f"invalid storage key {key!r}: only printable ASCII without spaces"
        )
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise StorageError(
            f"invalid storage key {key!r}: empty, '.' or '..' path segment"
        )
    return key


def video_key(prefix: str, user_id: str, generation_id: str) -> str:
    """The key of a generation's video (its extension is always .mp4).

    The extension does not promise the format: a WebM or MOV download keeps
    this key and gets its real Content-Type.
    """
    return check_key(f"{prefix}{user_id}/{generation_id}.mp4")


def thumbnail_key(video: str) -> str:
    """The key of the JPEG thumbnail stored beside ``video``."""
    stem, dot, ext = video.rpartition(".")
    if not dot or "/" in ext:
        return check_key(f"{video}.jpg")
    return check_key(f"{stem}.jpg")


def reference_key(user_id: str, content_type: str) -> str:
    """A new, unguessable key for a reference image uploaded by ``user_id``."""
    ext = REFERENCE_EXTENSIONS[content_type]
    return check_key(f"{REFERENCE_PREFIX}{user_id}/{uuid.uuid4()}.{ext}")


def is_reference_key_of(key: str, user_id: str) -> bool:
    """True when ``key`` is a valid reference-image key scoped to ``user_id``."""
    own = f"{REFERENCE_PREFIX}{user_id}/"
    rest = key[len(own) :]
    if not key.startswith(own) or not rest or "/" in rest:
        return False
    try:
        check_key(key)
    except StorageError:
        return False
    return True
