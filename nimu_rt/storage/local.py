"""Objects as files under the data directory: the embedded default.

Layout under the root (``storage.local_dir``, default ``{data_dir}/objects``)::

    data/<key>                    the object's bytes
    meta/<key>.json               Content-Type, size, SHA-256, ETag
    uploads/<upload id>/          an unfinished multipart upload:
        upload.json                   its key, type and start time
        <n>.part                      part n
    tmp/                          files being written, renamed into place

Every write goes to ``tmp/`` first and is renamed into place, so a reader
never sees half an object. Uploads run the same engine as R2
(:mod:`nimu_rt.storage.upload`), with the same part sizes, resume and abort,
so the embedded default behaves like production.

Objects are served by the app itself at signed links (see
:mod:`nimu_rt.storage.signing` and :mod:`nimu_rt.api.storage`). Files are
not fsynced: a power cut may lose the last writes, which a laptop can live
with and production (R2) does not face. One process owns the directory;
two services sharing it may overwrite each other's uploads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlencode

import msgspec

from nimu_rt.config import StorageSettings
from nimu_rt.errors import Forbidden, NotFound, PayloadTooLarge, StorageError
from nimu_rt.storage.base import (
    ObjectInfo,
    PartRecord,
    PendingUpload,
    PresignedUpload,
    ProgressCallback,
    SourceOpener,
    StateCallback,
    Storage,
    StoredObject,
    UploadState,
)
from nimu_rt.storage.keys import check_key
from nimu_rt.storage.signing import LinkSigner, expired, expires_at
from nimu_rt.storage.upload import (
    MultipartTarget,
    RetryPolicy,
    UploadGone,
    UploadOptions,
    multipart_etag,
    upload_stream,
)

OBJECTS_ROUTE = "/api/storage/objects/"
_CHUNK_BYTES = 256 * 1024


class _Meta(msgspec.Struct, kw_only=True, rename="camel"):
    content_type: str
    size_bytes: int
    sha256: str | None = None
    etag: str | None = None


class _UploadInfo(msgspec.Struct, kw_only=True, rename="camel"):
    key: str
    content_type: str
    initiated_at: dt.datetime


class LocalStorage(Storage, MultipartTarget):
    """Objects as files in one directory, served by this app."""

    kind = "local"

    def __init__(
        self,
        settings: StorageSettings,
        root: Path,
        signer: LinkSigner,
        *,
        base_url: str = "",
    ) -> None:
        """``base_url`` prefixes links; empty gives links relative to the app."""
        self.settings = settings
        self.root = root
        self.signer = signer
        self.base_url = base_url.rstrip("/")
        self._data = root / "data"
        self._meta = root / "meta"
        self._uploads = root / "uploads"
        self._tmp = root / "tmp"
        self.upload_options = UploadOptions(
            part_size_bytes=settings.part_size_bytes,
            max_parallel_parts=settings.max_parallel_parts,
            retry=RetryPolicy(
                attempts=settings.request_attempts,
                base_delay_s=settings.retry_base_delay_s,
                max_delay_s=settings.retry_max_delay_s,
            ),
            source_attempts=settings.source_attempts,
            source_read_timeout_s=settings.read_timeout_s,
        )

    async def open(self) -> None:
        """Create the directories; files left in ``tmp/`` by a crash are removed."""

        def prepare() -> None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            for folder in (self._data, self._meta, self._uploads, self._tmp):
                folder.mkdir(parents=True, exist_ok=True)

        await asyncio.to_thread(prepare)

    async def close(self) -> None:
        """Nothing to release; safe to call twice."""

    # -- paths -----------------------------------------------------------------

    def local_path(self, key: str) -> Path:
        """The file of ``key`` (which may not exist)."""
        return self._data.joinpath(*check_key(key).split("/"))

    def _meta_path(self, key: str) -> Path:
        return self._meta.joinpath(*check_key(key).split("/")).with_name(
            key.rsplit("/", 1)[-1] + ".json"
        )

    def _tmp_path(self) -> Path:
        return self._tmp / uuid.uuid4().hex

    def _upload_dir(self, upload_id: str) -> Path:
        # Upload ids are ours (uuid hex); anything else names no upload.
        if len(upload_id) != 32 or not all(c in "0123456789abcdef" for c in upload_id):
            raise UploadGone(f"no upload {upload_id!r}")
        return self._uploads / upload_id

    def _place(self, tmp: Path, key: str, meta: _Meta) -> None:
        target = self.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)
        meta_path = self._meta_path(key)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_tmp = self._tmp_path()
        meta_tmp.write_bytes(msgspec.json.encode(meta))
        os.replace(meta_tmp, meta_path)

    # -- uploads ---------------------------------------------------------------

    async def upload_stream(
        self,
        key: str,
        open_source: SourceOpener,
        *,
        content_type: str,
        state: UploadState | None = None,
        on_state: StateCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> StoredObject:
        """Stream into ``key`` as described in :mod:`nimu_rt.storage.upload`."""
        return await upload_stream(
            self,
            key,
            open_source,
            content_type=content_type,
            options=self.upload_options,
            state=state,
            on_state=on_state,
            on_progress=on_progress,
        )

    async def abort_upload(self, state: UploadState) -> None:
        """Remove the upload ``state`` names and its parts (idempotent)."""
        if state.upload_id is not None:
            await self.abort_multipart(state.key, state.upload_id)

    async def create_upload(self, key: str, *, content_type: str) -> str:
        upload_id = uuid.uuid4().hex
        info = _UploadInfo(
            key=check_key(key),
            content_type=content_type,
            initiated_at=dt.datetime.now(dt.UTC),
        )

        def create() -> None:
            folder = self._uploads / upload_id
            folder.mkdir(parents=True)
            (folder / "upload.json").write_bytes(msgspec.json.encode(info))

        await asyncio.to_thread(create)
        return upload_id

    async def uploaded_parts(
        self, key: str, upload_id: str
    ) -> dict[int, PartRecord] | None:
        try:
            folder = self._upload_dir(upload_id)
        except UploadGone:
            return None

        def scan() -> dict[int, PartRecord] | None:
            if not (folder / "upload.json").is_file():
                return None
            parts = {}
            for path in folder.glob("*.part"):
                number = int(path.stem)
                parts[number] = PartRecord(
                    number=number,
                    etag=_file_md5(path),
                    size_bytes=path.stat().st_size,
                )
            return parts

        return await asyncio.to_thread(scan)

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: memoryview, md5: bytes
    ) -> str:
        folder = self._upload_dir(upload_id)

        def write() -> str:
            if not (folder / "upload.json").is_file():
                raise UploadGone(f"upload {upload_id} of {key} does not exist")
            tmp = self._tmp_path()
            with open(tmp, "wb") as out:
                out.write(body)
            os.replace(tmp, folder / f"{number}.part")
            return hashlib.md5(body, usedforsecurity=False).hexdigest()

        return await asyncio.to_thread(write)

    async def complete_upload(
        self,
        key: str,
        upload_id: str,
        parts: list[PartRecord],
        *,
        content_type: str,
        sha256: str,
    ) -> str | None:
        folder = self._upload_dir(upload_id)
        etag = multipart_etag(parts)

        def join() -> None:
            if not (folder / "upload.json").is_file():
                raise UploadGone(f"upload {upload_id} of {key} does not exist")
            tmp = self._tmp_path()
            with open(tmp, "wb") as out:
                for part in parts:
                    path = folder / f"{part.number}.part"
                    if not path.is_file() or path.stat().st_size != part.size_bytes:
                        raise StorageError(f"part {part.number} of {key} is missing")
                    with open(path, "rb") as source:
                        shutil.copyfileobj(source, out, _CHUNK_BYTES)
            size = sum(p.size_bytes for p in parts)
            meta = _Meta(
                content_type=content_type, size_bytes=size, sha256=sha256, etag=etag
            )
            self._place(tmp, key, meta)
            shutil.rmtree(folder, ignore_errors=True)

        await asyncio.to_thread(join)
        return etag

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            folder = self._upload_dir(upload_id)
        except UploadGone:
            return
        await asyncio.to_thread(shutil.rmtree, folder, True)

    async def put_object(
        self, key: str, body: memoryview, *, content_type: str, sha256: str, md5: bytes
    ) -> str | None:
        def write() -> str:
            etag = hashlib.md5(body, usedforsecurity=False).hexdigest()
            tmp = self._tmp_path()
            with open(tmp, "wb") as out:
                out.write(body)
            meta = _Meta(
                content_type=content_type,
                size_bytes=len(body),
                sha256=sha256,
                etag=etag,
            )
            self._place(tmp, key, meta)
            return etag

        check_key(key)
        return await asyncio.to_thread(write)

    async def receive(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        content_type: str,
        max_bytes: int,
    ) -> ObjectInfo:
        """Write a streamed request body to ``key`` (the local presigned PUT).

        Raises PayloadTooLarge as soon as more than ``max_bytes`` arrive; the
        object is then left as it was.
        """
        check_key(key)
        tmp = self._tmp_path()
        out = await asyncio.to_thread(open, tmp, "wb")
        sha256 = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"at most {max_bytes} bytes may be uploaded")
                sha256.update(chunk)
                md5.update(chunk)
                await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(out.close)
            meta = _Meta(
                content_type=content_type,
                size_bytes=size,
                sha256=sha256.hexdigest(),
                etag=md5.hexdigest(),
            )
            await asyncio.to_thread(self._place, tmp, key, meta)
        finally:
            out.close()
            tmp.unlink(missing_ok=True)
        found = await self.head(key)
        assert found is not None
        return found

    # -- small objects -----------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Write ``data`` to ``key`` in one go."""
        view = memoryview(data)
        await self.put_object(
            key,
            view,
            content_type=content_type,
            sha256=hashlib.sha256(data).hexdigest(),
            md5=hashlib.md5(data, usedforsecurity=False).digest(),
        )

    async def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        """The whole object; NotFound if missing, PayloadTooLarge if too big."""
        path = self.local_path(key)

        def read() -> bytes:
            try:
                with open(path, "rb") as source:
                    data = source.read(max_bytes + 1)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"no stored object {key}") from None
            if len(data) > max_bytes:
                raise PayloadTooLarge(f"{key} is larger than {max_bytes} bytes")
            return data

        return await asyncio.to_thread(read)

    async def read_stream(self, key: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        path = self.local_path(key)
        try:
            source = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no stored object {key}") from None
        try:
            await asyncio.to_thread(source.seek, offset)
            while chunk := await asyncio.to_thread(source.read, _CHUNK_BYTES):
                yield chunk
        finally:
            source.close()

    async def head(self, key: str) -> ObjectInfo | None:
        path = self.local_path(key)
        meta_path = self._meta_path(key)

        def stat() -> ObjectInfo | None:
            try:
                st = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            try:
                meta = msgspec.json.decode(meta_path.read_bytes(), type=_Meta)
            except (OSError, msgspec.DecodeError):
                meta = _Meta(content_type="application/octet-stream", size_bytes=0)
            return ObjectInfo(
                key=key,
                size_bytes=st.st_size,
                modified_at=dt.datetime.fromtimestamp(st.st_mtime, dt.UTC),
                content_type=meta.content_type,
                sha256=meta.sha256,
                etag=meta.etag,
            )

        return await asyncio.to_thread(stat)

    async def delete(self, keys: list[str]) -> None:
        """Remove the objects and their metadata; missing keys are fine."""
        paths = [(self.local_path(k), self._meta_path(k)) for k in keys]

        def remove() -> None:
            for data, meta in paths:
                for path, top in ((data, self._data), (meta, self._meta)):
                    try:
                        path.unlink()
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    _prune_empty_parents(path.parent, top)

        await asyncio.to_thread(remove)

    # -- listings ----------------------------------------------------------------

    async def iter_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        def scan() -> list[str]:
            keys = []
            for path in self._data.rglob("*"):
                if path.is_file():
                    key = path.relative_to(self._data).as_posix()
                    if key.startswith(prefix):
                        keys.append(key)
            return sorted(keys)

        for key in await asyncio.to_thread(scan):
            found = await self.head(key)
            if found is not None:
                yield found

    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        def scan() -> list[PendingUpload]:
            found = []
            for info_path in self._uploads.glob("*/upload.json"):
                try:
                    info = msgspec.json.decode(info_path.read_bytes(), type=_UploadInfo)
                except (OSError, msgspec.DecodeError):
                    continue
                if info.key.startswith(prefix):
                    found.append(
                        PendingUpload(
                            key=info.key,
                            upload_id=info_path.parent.name,
                            initiated_at=info.initiated_at,
                        )
                    )
            return sorted(found, key=lambda u: u.initiated_at)

        return await asyncio.to_thread(scan)

    async def abort_pending(self, upload: PendingUpload) -> None:
        await self.abort_multipart(upload.key, upload.upload_id)

    # -- links -------------------------------------------------------------------

    async def signed_url(self, key: str, *, expires_s: int) -> str:
        """A link this app serves (GET and HEAD, with Range) until it expires."""
        exp = str(expires_at(expires_s))
        sig = self.signer.sign("GET", check_key(key), exp)
        query = urlencode({"exp": exp, "sig": sig})
        return f"{self.base_url}{OBJECTS_ROUTE}{quote(key)}?{query}"

    async def presigned_put(
        self,
        key: str,
        *,
        content_type: str,
        max_bytes: int,
        expires_s: int,
        size_bytes: int | None = None,
    ) -> PresignedUpload:
        """A link this app accepts one PUT of ``key`` at, like R2's.

        The Content-Type must be the one signed; the body must be exactly
        ``size_bytes`` long when given, else at most ``max_bytes``.
        """
        check_key(key)
        if size_bytes is not None and size_bytes > max_bytes:
            raise PayloadTooLarge(f"at most {max_bytes} bytes may be uploaded")
        exp = str(expires_at(expires_s))
        length = "" if size_bytes is None else str(size_bytes)
        fields = ("PUT", key, exp, content_type, length, str(max_bytes))
        params = {"exp": exp, "type": content_type, "max": str(max_bytes)}
        if length:
            params["len"] = length
        params["sig"] = self.signer.sign(*fields)
        expires = dt.datetime.fromtimestamp(int(exp), dt.UTC)
        return PresignedUpload(
            key=key,
            url=f"{self.base_url}{OBJECTS_ROUTE}{quote(key)}?{urlencode(params)}",
            headers={"Content-Type": content_type},
            expires_at=expires,
            max_bytes=size_bytes if size_bytes is not None else max_bytes,
        )

    def check_link(self, method: str, key: str, params: dict[str, str]) -> None:
        """Raise Forbidden unless ``params`` are a valid, unexpired link.

        ``method`` is GET (HEAD uses GET links) or PUT. Says which of
        expired or invalid it is in the error's ``reason``.
        """
        exp = params.get("exp", "")
        sig = params.get("sig", "")
        if method == "PUT":
            fields = (
                "PUT",
                key,
                exp,
                params.get("type", ""),
                params.get("len", ""),
                params.get("max", ""),
            )
        else:
            fields = ("GET", key, exp)
        if not exp.isdigit() or not sig or not self.signer.verify(sig, *fields):
            raise Forbidden(
                "the link is not valid: its signature does not match",
                reason="invalid_signature",
            )
        if expired(int(exp)):
            raise Forbidden("the link has expired; ask for a new one", reason="expired")


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _prune_empty_parents(folder: Path, top: Path) -> None:
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
