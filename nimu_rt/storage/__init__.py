"""Video storage: R2 through its S3 API, or local files; uploads and videos.

:func:`create_storage` builds the backend ``[storage]`` names. The
interface is :class:`~nimu_rt.storage.base.Storage`; the upload engine is
in :mod:`nimu_rt.storage.upload`, video handling in
:mod:`nimu_rt.storage.video`.
"""

from __future__ import annotations

from pathlib import Path

from nimu_rt.config import Settings
from nimu_rt.errors import ConfigError
from nimu_rt.storage.base import Storage
from nimu_rt.storage.upload import MAX_PARTS


def create_storage(settings: Settings) -> Storage:
    """The storage backend of ``settings`` (not opened yet).

    Raises ConfigError when the settings cannot work together: a maximum
    video size beyond 10,000 parts, or fewer pooled connections than parts
    in flight.
    """
    s = settings.storage
    if s.max_video_bytes > MAX_PARTS * s.part_size_bytes:
        raise ConfigError(
            f"storage.max_video_bytes: {s.max_video_bytes} is more than"
            f" {MAX_PARTS} parts of storage.part_size_bytes ({s.part_size_bytes})"
        )
    if s.max_connections <= s.max_parallel_parts:
        raise ConfigError(
            "storage.max_connections must be larger than storage.max_parallel_parts"
        )
    if s.backend == "r2":
        # Imported here: aiobotocore is slow to import and the embedded
        # default does not need it.
        from nimu_rt.storage.r2 import R2Storage

        return R2Storage(s)

    from nimu_rt.auth import signing_secret
    from nimu_rt.storage.local import LocalStorage
    from nimu_rt.storage.signing import LinkSigner, derive_key

    root = (
        Path(s.local_dir).expanduser().resolve()
        if s.local_dir
        else settings.data_path / "objects"
    )
    signer = LinkSigner(derive_key(signing_secret(settings)))
    return LocalStorage(s, root, signer, base_url=settings.server.public_url)


__all__ = ["Storage", "create_storage"]
