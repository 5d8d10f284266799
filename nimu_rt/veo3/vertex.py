"""Veo 3 on Vertex AI (also sold as Gemini Enterprise Agent Platform).

Submit ``POST {model}:predictLongRunning`` on the regional endpoint, poll
``POST {model}:fetchPredictOperation`` with ``{"operationName": ...}`` (the
generic operations route rejects Veo's ids). The finished video comes back
inline as base64 or, when ``veo3.vertex_storage_uri`` is set, as a
``gs://`` object that is downloaded through the Cloud Storage JSON API.

Authentication is an OAuth bearer token: a fixed one from
``veo3.vertex_access_token``, or one minted and refreshed by google-auth
(the optional ``vertex`` extra) from ``veo3.vertex_credentials_file`` or the
application default credentials.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx

from nimu_rt.config import Settings
from nimu_rt.errors import ConfigError, Veo3Final, Veo3Retryable
from nimu_rt.models import GenerationOptions
from nimu_rt.veo3 import codes
from nimu_rt.veo3.client import (
    Failed,
    ImageInput,
    PollResult,
    Running,
    Succeeded,
    VideoRef,
)
from nimu_rt.veo3.gemini import no_video_error, request_body
from nimu_rt.veo3.transport import HttpVeo3Client, decode_inline, operation_error

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_OPERATION_NAME = re.compile(
    r"^projects/[^/]+/locations/[^/]+/publishers/google/models/[^/]+"
    r"/operations/[A-Za-z0-9._-]+$"
)


def vertex_base_url(location: str) -> str:
    """Google's endpoint for ``location`` (``global`` has no region prefix)."""
    if location == "global":
        return "https://aiplatform.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


class TokenSource(Protocol):
    """Gives a currently valid OAuth access token."""

    async def token(self) -> str:
        """A token valid for at least the next request."""
        ...


class StaticToken:
    """A token fixed in config; it is never refreshed."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        """The configured token, as it is."""
        return self._token


class GoogleAuthToken:
    """Tokens minted by google-auth from a service account or the ADC.

    google-auth is synchronous: a refresh runs in a worker thread, through
    a small httpx transport that applies our timeout, one refresh at a time.
    A token is refreshed when google-auth considers it (nearly) expired; a
    token revoked early is not noticed until it expires.
    """

    def __init__(self, credentials: Any, *, timeout_s: float) -> None:
        self._credentials = credentials
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> GoogleAuthToken:
        """Credentials from the configured file, else the ADC.

        Raises ConfigError when google-auth is missing or the file is bad.
        """
        try:
            import google.auth
            import google.auth.exceptions
            from google.oauth2 import service_account
        except ImportError:
            raise ConfigError(
                "veo3: Vertex AI credentials need google-auth; install the"
                " extra (uv sync --extra vertex) or set veo3.vertex_access_token"
            ) from None
        path = settings.veo3.vertex_credentials_file
        try:
            if path:
                credentials = service_account.Credentials.from_service_account_file(
                    path, scopes=[CLOUD_PLATFORM_SCOPE]
                )
            else:
                credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
        except (OSError, ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            key = "vertex_credentials_file" if path else "vertex_access_token"
            raise ConfigError(
                f"veo3.{key}: no usable Vertex AI credentials: {exc}"
            ) from None
        return cls(credentials, timeout_s=settings.veo3.request_timeout_s)

    async def token(self) -> str:
        """The current token, refreshed first when (nearly) expired.

        Raises Veo3Retryable when Google's token endpoint cannot be reached
        and Veo3Final when it refuses the credentials.
        """
        async with self._lock:
            if not self._credentials.valid:
                await asyncio.to_thread(self._refresh)
            return str(self._credentials.token)

    def _refresh(self) -> None:
        import google.auth.exceptions

        with httpx.Client(timeout=self._timeout_s) as http:
            try:
                self._credentials.refresh(_HttpxAuthRequest(http))
            except google.auth.exceptions.TransportError as exc:
                raise Veo3Retryable(
                    f"cannot reach Google's token endpoint: {exc}",
                    code=codes.CONNECTION_FAILED,
                ) from None
            except google.auth.exceptions.RefreshError as exc:
                raise Veo3Final(
                    f"Google refused to issue a Vertex AI token: {exc}",
                    code=codes.AUTH_FAILED,
                ) from None


class _HttpxAuthResponse:
    """google-auth's transport Response interface over an httpx response."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = dict(response.headers)
        self.data = response.content


class _HttpxAuthRequest:
    """google-auth's transport Request interface, with httpx underneath."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> _HttpxAuthResponse:
        import google.auth.exceptions

        try:
            response = self._http.request(
                method,
                url,
                content=body,
                headers=headers,
                **({"timeout": timeout} if timeout else {}),
            )
        except httpx.HTTPError as exc:
            raise google.auth.exceptions.TransportError(exc) from exc
        return _HttpxAuthResponse(response)


class VertexClient(HttpVeo3Client):
    """The Vertex AI flavour of :class:`~nimu_rt.veo3.client.Veo3Client`.

    Inline videos (no ``vertex_storage_uri``) are decoded from the poll
    answer and held whole in memory; set a storage URI for large videos.
    ``gs://`` videos are read with the same token, which needs read access
    to the bucket.
    """

    provider = "vertex"

    def __init__(
        self,
        settings: Settings,
        *,
        tokens: TokenSource,
        base_url: str | None = None,
        typical_generation_s: float | None = None,
    ) -> None:
        cfg = settings.veo3
        if not cfg.vertex_project:
            raise ValueError("Vertex AI needs veo3.vertex_project")
        super().__init__(
            settings,
            base_url=base_url or cfg.base_url or vertex_base_url(cfg.vertex_location),
            typical_generation_s=typical_generation_s,
        )
        self._tokens = tokens
        self._prefix = f"{self.base_url}/{quote(cfg.vertex_api_version, safe='')}"

    async def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self._tokens.token()}"}

    def _download_request(self, uri: str) -> tuple[str, bool]:
        target = urlsplit(uri)
        if target.scheme == "gs":
            bucket, object_name = target.netloc, target.path.lstrip("/")
            if not bucket or not object_name:
                raise Veo3Final(f"not an object URI: {uri}", code=codes.UNSUPPORTED)
            gcs = self.config.gcs_base_url.rstrip("/")
            url = (
                f"{gcs}/storage/v1/b/{quote(bucket, safe='')}/o/"
                f"{quote(object_name, safe='')}?alt=media"
            )
            return url, True
        if target.scheme in ("http", "https"):
            own = urlsplit(self.base_url)
            return uri, (target.scheme, target.netloc) == (own.scheme, own.netloc)
        raise Veo3Final(f"cannot download {uri}", code=codes.UNSUPPORTED)

    def _model_resource(self, model: str) -> str:
        cfg = self.config
        return (
            f"projects/{quote(cfg.vertex_project, safe='')}"
            f"/locations/{quote(cfg.vertex_location, safe='')}"
            f"/publishers/google/models/{quote(model, safe='')}"
        )

    async def generate_video(
        self,
        prompt: str,
        options: GenerationOptions,
        *,
        image: ImageInput | None = None,
    ) -> str:
        """Start a paid generation; return the operation name.

        Resent only when Google surely did not accept it (see
        :mod:`nimu_rt.veo3.transport`); otherwise ``veo3_submit_ambiguous``.
        """
        body = request_body(
            prompt,
            options,
            image=image,
            audio_switch=True,
            storage_uri=self.config.vertex_storage_uri or None,
        )
        doc = await self._call_json(
            "submit",
            "POST",
            f"{self._prefix}/{self._model_resource(options.model)}:predictLongRunning",
            body=body,
        )
        name = doc.get("name")
        if not isinstance(name, str) or not name:
            raise Veo3Retryable(
                "Veo 3 accepted the request but its answer has no operation name",
                code=codes.SUBMIT_AMBIGUOUS,
            )
        return name

    async def poll(self, operation_name: str) -> PollResult:
        """The operation's state, read with ``fetchPredictOperation``."""
        if not _OPERATION_NAME.match(operation_name):
            raise Veo3Final(
                f"{operation_name!r} is not a Vertex AI operation name",
                code=codes.OPERATION_NOT_FOUND,
            )
        model = operation_name.rpartition("/operations/")[0]
        doc = await self._call_json(
            "poll",
            "POST",
            f"{self._prefix}/{model}:fetchPredictOperation",
            body={"operationName": operation_name},
            operation_name=operation_name,
        )
        return parse_operation(doc, operation_name)


def parse_operation(doc: dict[str, Any], operation_name: str) -> PollResult:
    """A Vertex operation document as a PollResult (``response.videos[]``)."""
    name = str(doc.get("name") or operation_name)
    if not doc.get("done"):
        return Running(name=name)
    if doc.get("error") is not None:
        return Failed(name=name, error=operation_error(doc["error"]))
    response = doc.get("response") if isinstance(doc.get("response"), dict) else {}
    videos = response.get("videos")
    for video in videos if isinstance(videos, list) else []:
        if not isinstance(video, dict):
            continue
        mime_type = str(video.get("mimeType") or "video/mp4")
        if isinstance(video.get("gcsUri"), str) and video["gcsUri"]:
            return Succeeded(
                name=name, video=VideoRef(uri=video["gcsUri"], mime_type=mime_type)
            )
        inline = decode_inline(video.get("bytesBase64Encoded"), mime_type)
        if inline is not None:
            return Succeeded(name=name, video=inline)
    return Failed(name=name, error=no_video_error(response))
