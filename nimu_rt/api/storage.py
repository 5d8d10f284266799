"""Routes of ``/api/storage``: playback links, deleting videos, uploads.

- ``GET /api/storage/videos/{id}``: links to a generation's video and
  thumbnail (signed, or public when the bucket has a public domain) and the
  video's metadata. Owner (or operator) only; anyone else gets 404.
- ``DELETE /api/storage/videos/{id}``: deletes the video and thumbnail
  objects. The generation stays, its ``video.deletedAt`` set through a
  store transaction, so every open tab hears of it.
- ``POST /api/storage/uploads``: a presigned PUT for a reference image under
  ``refs/{userId}/``, the only keys ``referenceImageKey`` accepts.
- ``GET|HEAD|PUT /api/storage/objects/{key}``: the local backend's stand-in
  for R2's presigned URLs: no bearer token, the link's signature is the
  permission. GET and HEAD honour a single ``Range`` (206, ``Content-Range``)
  so a ``<video>`` can seek; several ranges in one request are answered
  with the whole object, which HTTP allows. 404 with the R2 backend.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from nimu_rt.api.common import json_response, principal, read_body, reader, services
from nimu_rt.api.schemas import Body
from nimu_rt.auth import Principal
from nimu_rt.errors import (
    Forbidden,
    NotFound,
    RangeNotSatisfiable,
    StorageError,
    ValidationFailed,
)
from nimu_rt.ids import is_id
from nimu_rt.models import Generation, Record, VideoInfo, utcnow
from nimu_rt.storage.keys import check_key, reference_key
from nimu_rt.storage.local import LocalStorage
from nimu_rt.storage.video import video_keys
from nimu_rt.store import Transaction

_CHUNK_BYTES = 256 * 1024


class VideoLinks(Record, kw_only=True):
    """Where to play a generation's video, until when, and what it is."""

    generation_id: str
    url: str
    thumbnail_url: str | None = None
    # None for public URLs, which do not expire.
    expires_at: dt.datetime | None = None
    video: VideoInfo


class ReferenceUploadBody(Body, kw_only=True):
    """What a client says about the reference image it is about to upload."""

    content_type: str
    # The exact size of the file: the presigned PUT accepts only that many
    # bytes (R2 cannot enforce a maximum otherwise).
    size_bytes: Annotated[int, Meta(ge=1)]


def _absolute(request: Request, url: str) -> str:
    # The local backend signs links relative to this app when no public URL
    # is configured; the client needs them absolute.
    if url.startswith("/"):
        return str(request.base_url).rstrip("/") + url
    return url


def _stored_video(generation: Generation) -> VideoInfo:
    video = generation.video
    if video is None:
        raise NotFound(
            f"generation {generation.id} has no stored video (it is"
            f" {generation.status})"
        )
    return video


async def _locked_for(
    tx: Transaction, caller: Principal, generation_id: str
) -> Generation:
    # The same rule as Generations.get: another user's generation is "not
    # found", so ids reveal nothing.
    generation = None
    if is_id(generation_id):
        generation = await tx.lock_generation(generation_id)
    if generation is None or not caller.may_access(generation.user_id):
        raise NotFound(f"no generation {generation_id}")
    return generation


async def get_video(request: Request) -> Response:
    """Links and metadata of a stored video; 404 if none, deleted or not ours.

    Does not check that the objects still exist: the record is the truth.
    A scoped read token for the generation is enough.
    """
    caller = reader(request, request.path_params["id"])
    svc = services(request)
    generation = await svc.generations.get(caller, request.path_params["id"])
    video = _stored_video(generation)
    if video.deleted_at is not None:
        raise NotFound(
            f"the video of generation {generation.id} was deleted",
            deletedAt=msgspec.to_builtins(video.deleted_at),
        )
    ttl_s = svc.settings.storage.signed_url_ttl_s
    url, expires_at = await svc.storage.playback_url(video.key, expires_s=ttl_s)
    thumbnail_url = None
    if video.thumbnail_key:
        thumbnail_url, _ = await svc.storage.playback_url(
            video.thumbnail_key, expires_s=ttl_s
        )
        thumbnail_url = _absolute(request, thumbnail_url)
    links = VideoLinks(
        generation_id=generation.id,
        url=_absolute(request, url),
        thumbnail_url=thumbnail_url,
        expires_at=expires_at,
        video=video,
    )
    # Signed links are per request and expire: no shared caches.
    return json_response(links, headers={"Cache-Control": "private, no-store"})


async def delete_video(request: Request) -> Response:
    """Delete the video and thumbnail; answer the generation, now marked.

    Repeating it is harmless. The generation itself is never deleted here.
    """
    caller = principal(request)
    svc = services(request)
    async with svc.store.transaction() as tx:
        generation = await _locked_for(tx, caller, request.path_params["id"])
        video = _stored_video(generation)
        if video.deleted_at is None:
            generation = await tx.change(
                generation,
                video=msgspec.structs.replace(video, deleted_at=utcnow()),
            )
    # Objects go after the record says so: if deleting them fails, the
    # client gets the error and the same DELETE, repeated, finishes the job.
    await svc.storage.delete(video_keys(video))
    return json_response(generation, headers={"ETag": f'"{generation.seq}"'})


async def create_upload(request: Request) -> Response:
    """A presigned PUT for one reference image of the caller (201).

    Checks the declared type and size; the bytes are checked when used.
    """
    caller = principal(request)
    svc = services(request)
    limits = svc.settings.storage
    body, _ = await read_body(request, ReferenceUploadBody)
    problems = []
    if body.content_type not in limits.reference_image_types:
        problems.append(
            {
                "path": "$.contentType",
                "message": "must be one of " + ", ".join(limits.reference_image_types),
            }
        )
    if body.size_bytes > limits.max_reference_image_bytes:
        problems.append(
            {
                "path": "$.sizeBytes",
                "message": f"must be at most {limits.max_reference_image_bytes}",
            }
        )
    if problems:
        raise ValidationFailed(problems)
    try:
        key = reference_key(caller.user_id, body.content_type)
    except StorageError:
        raise ValidationFailed(
            "this user id cannot be part of a storage key"
        ) from None
    upload = await svc.storage.presigned_put(
        key,
        content_type=body.content_type,
        max_bytes=limits.max_reference_image_bytes,
        expires_s=limits.upload_url_ttl_s,
        size_bytes=body.size_bytes,
    )
    upload = msgspec.structs.replace(upload, url=_absolute(request, upload.url))
    return json_response(upload, 201)


# -- the local backend's objects -------------------------------------------------


def _local(request: Request) -> tuple[LocalStorage, str]:
    storage = services(request).storage
    if not isinstance(storage, LocalStorage):
        raise NotFound("objects are served by the storage backend, not here")
    key = request.path_params["key"]
    try:
        return storage, check_key(key)
    except StorageError:
        raise NotFound(f"no object {key!r}") from None


async def get_object(request: Request) -> Response:
    """Serve a local object at a signed link, whole or one byte range."""
    storage, key = _local(request)
    storage.check_link("GET", key, dict(request.query_params))
    info = await storage.head(key)
    if info is None:
        raise NotFound(f"no object {key}")
    size = info.size_bytes
    etag = f'"{info.etag}"' if info.etag else None
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Type": info.content_type or "application/octet-stream",
        "Cache-Control": "private, max-age=3600",
        "Last-Modified": info.modified_at.strftime("%a, %d %b %Y %H:%M:%S GMT"),
    }
    if etag:
        headers["ETag"] = etag
    wanted = byte_range(request.headers.get("range"), size)
    if_range = request.headers.get("if-range")
    if wanted is not None and if_range is not None and if_range != etag:
        # The client's copy is of another version: send the whole object.
        wanted = None
    status = 200
    start, end = 0, size
    if wanted is not None:
        start, end = wanted
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    path = storage.local_path(key)
    return StreamingResponse(
        _file_chunks(path, start, end), status_code=status, headers=headers
    )


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open ``(start, end)`` a Range header asks for, or None.

    None means "send everything": no header, a syntax we do not serve
    (several ranges, other units) or an invalid one, all of which HTTP lets a
    server ignore. Raises :class:`RangeNotSatisfiable` for a range that
    starts at or past the end.
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size)
    end = size if not last else min(size, int(last) + 1)
    return start, end


async def _file_chunks(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    source = await asyncio.to_thread(open, path, "rb")
    try:
        await asyncio.to_thread(source.seek, start)
        remaining = end - start
        while remaining > 0:
            chunk = await asyncio.to_thread(source.read, min(_CHUNK_BYTES, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
    finally:
        source.close()


async def put_object(request: Request) -> Response:
    """Store the body at a signed upload link, as R2 would a presigned PUT.

    The bytes are not inspected, as R2 would not either.
    """
    storage, key = _local(request)
    params = dict(request.query_params)
    storage.check_link("PUT", key, params)
    # Like R2 with a presigned PUT: the signed Content-Type and length are
    # part of the permission, so a request that differs is refused.
    content_type = request.headers.get("content-type", "")
    if content_type != params.get("type"):
        raise Forbidden(
            f"this link accepts Content-Type {params.get('type')}, not"
            f" {content_type or 'none'}",
            reason="content_type_mismatch",
        )
    exact = params.get("len")
    declared = request.headers.get("content-length")
    if exact and declared != exact:
        raise Forbidden(
            f"this link accepts exactly {exact} bytes",
            reason="content_length_mismatch",
        )
    limit = int(exact or params.get("max", "0"))
    info = await storage.receive(
        key, request.stream(), content_type=content_type, max_bytes=limit
    )
    return Response(status_code=200, headers={"ETag": f'"{info.etag}"'})


routes = [
    Route("/api/storage/videos/{id}", get_video, methods=["GET"]),
    Route("/api/storage/videos/{id}", delete_video, methods=["DELETE"]),
    Route("/api/storage/uploads", create_upload, methods=["POST"]),
    Route("/api/storage/objects/{key:path}", get_object, methods=["GET", "HEAD"]),
    Route("/api/storage/objects/{key:path}", put_object, methods=["PUT"]),
]
