"""A local Veo 3: the Gemini and Vertex wire formats, real MP4s, injected faults.

:func:`create_simulator_app` builds a Starlette app that answers like
Google's two Veo 3 APIs, so the real client is tested over real HTTP and the
embedded default makes videos without an account. :class:`SimulatorServer`
runs it under uvicorn on a loopback port inside the current event loop
(``nimu-rt serve`` does so when ``veo3.provider`` is "simulator");
``nimu-rt veo3-sim`` runs it alone.

Routes
------

Gemini API::

    POST /v1beta/models/{model}:predictLongRunning     -> {"name": ...}
    GET  /v1beta/models/{model}/operations/{id}         -> the operation
    GET  /v1beta/files/{id}:download?alt=media          -> 302, or the MP4

Vertex AI (``v1`` or ``v1beta1``)::

    POST /v1/{model}:predictLongRunning
    POST /v1/{model}:fetchPredictOperation
        where {model} is projects/{p}/locations/{l}/publishers/google/models/{m}
    GET  /storage/v1/b/{bucket}/o/{object}?alt=media     (gs:// results)
    POST /_sim/oauth2/token                              (service-account grant)

Administration (no credentials; loopback tool)::

    GET  /_sim/stats    submissions (total and per prompt), requests per
                        stage, injected faults
    POST /_sim/reset    forget operations and counts

The simulator checks what Google checks: the API key (``x-goog-api-key`` or
``?key=``) or bearer token, the model (unknown -> 404, retired -> 404 "is no
longer available"), and the request (no instances, bad aspect ratio,
duration, resolution, 1080p/4k without 8 s, sampleCount, images in either
``bytesBase64Encoded`` or ``inlineData`` spelling) -> 400
INVALID_ARGUMENT. An operation is running for ``simulator.generation_s``,
then done with a video whose size follows the aspect ratio and
``simulator.frame_short_side_px`` and whose length is the requested
duration; Gemini results are downloaded (through a 302 to a second, signed
URL when ``simulator.redirect_downloads``), Vertex ones come back inline or,
with ``storageUri``, as ``gs://`` objects. Downloads honour ``Range``. There
is no cancel route (404), as with Google.

Unlike Google's Gemini API, ``generateAudio: false`` is honoured on the
Gemini route too, so the embedded default can make silent videos. The token
endpoint does not verify the assertion's signature.

Prompt markers
--------------

A marker in the prompt forces an outcome for that prompt; several may be
combined::

    [sim:safety]           the operation ends blocked by the safety filter
    [sim:error]            the operation ends with error code 13 (INTERNAL);
    [sim:error=3]          or with the given gRPC code (3: INVALID_ARGUMENT)
    [sim:gen=30]           the operation runs 30 s instead of generation_s
    [sim:bytes=209715200]  the video is padded to this many bytes (a free box)
    [sim:rate=1048576]     downloads are served at most this many bytes/s
    [sim:expired]          the download answers 404, as after retention
    [sim:FAULT]            inject FAULT once, on the submit
    [sim:FAULT@STAGE*N]    inject FAULT on the first N requests of STAGE

FAULT is ``429`` (with RetryInfo and Retry-After), ``500``, ``503``,
``slow`` (the answer is held ``simulator.slow_s`` or until the client gives
up), ``malformed`` (a 200 whose JSON is cut short) or ``drop`` (the
connection closes halfway through a download; its default stage is
download). STAGE is ``submit``, ``poll`` or ``download``. On a submit, 500,
slow and malformed come *after* the operation was created, as when Google
accepted a request but the answer was lost: a careful client cannot tell
and must not submit again. 429 and 503 come before. Counts are kept per
prompt text, so a retried request meets the rest of its faults.

Random faults
-------------

``simulator.fault_*_rate`` inject the same faults into any request at
random, and ``operation_error_rate`` / ``safety_filter_rate`` into
operations, drawn from a generator seeded with ``simulator.fault_seed``:
the same requests in the same order meet the same faults.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import random
import re
import secrets
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt
import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from nimu_rt.config import Settings, SimulatorSettings
from nimu_rt.errors import ConfigError
from nimu_rt.sockets import listening_socket
from nimu_rt.veo3.media import PaddedVideo, frame_size, render_mp4

log = logging.getLogger(__name__)

FAULTS = ("429", "500", "503", "slow", "malformed", "drop")
STAGES = ("submit", "poll", "download")
_JSON_ONLY = {"malformed"}
_DOWNLOAD_ONLY = {"drop"}
_MARKER = re.compile(r"\[sim:([a-z0-9]+)(?:=([0-9.]+))?(?:@([a-z]+))?(?:\*(\d+))?\]")
_GRPC_NAMES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
}
_SAFETY_REASON = (
    "We encountered an issue with the audio for your prompt, which means we"
    " could not create your video. This can sometimes happen due to our safety"
    " filters or other processing issues. Please modify your request and try"
    " again. You have not been charged for this attempt."
)
_GEMINI_RESPONSE_TYPE = (
    "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse"
)
_VERTEX_RESPONSE_TYPE = (
    "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse"
)
_BODY_CHUNK_BYTES = 256 * 1024


class GoogleError(Exception):
    """An error answered in Google's envelope."""

    def __init__(
        self,
        http_status: int,
        status: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status
        self.message = message
        self.details = details or []
        self.headers = headers or {}

    def response(self) -> Response:
        """The error as Google writes it: ``{"error": {code, message, ...}}``."""
        error: dict[str, Any] = {
            "code": self.http_status,
            "message": self.message,
            "status": self.status,
        }
        if self.details:
            error["details"] = self.details
        return Response(
            msgspec.json.encode({"error": error}),
            status_code=self.http_status,
            media_type="application/json; charset=UTF-8",
            headers=self.headers,
        )


def _invalid(message: str) -> GoogleError:
    return GoogleError(400, "INVALID_ARGUMENT", message)


@dataclass
class Markers:
    """What a prompt's ``[sim:...]`` markers ask for."""

    faults: dict[tuple[str, str], int] = field(default_factory=dict)
    safety: bool = False
    error_code: int | None = None
    generation_s: float | None = None
    size_bytes: int | None = None
    # Download speed limit, so that a test can catch a job mid-upload.
    rate_bytes_per_s: float | None = None
    expired: bool = False


def parse_markers(prompt: str) -> Markers:
    """The markers in ``prompt``; raises GoogleError 400 for an unknown one."""
    markers = Markers()
    for match in _MARKER.finditer(prompt):
        name, value, stage, count = match.groups()
        if name in FAULTS:
            stage = stage or ("download" if name in _DOWNLOAD_ONLY else "submit")
            misplaced = (name in _JSON_ONLY and stage == "download") or (
                name in _DOWNLOAD_ONLY and stage != "download"
            )
            if stage not in STAGES or value is not None or misplaced:
                raise _invalid(f"bad simulator marker {match[0]}")
            markers.faults[(name, stage)] = int(count or 1)
        elif stage is not None or count is not None:
            raise _invalid(f"bad simulator marker {match[0]}")
        elif name == "safety" and value is None:
            markers.safety = True
        elif name == "error":
            markers.error_code = int(float(value)) if value else 13
        elif name == "gen" and value is not None:
            markers.generation_s = float(value)
        elif name == "bytes" and value is not None:
            markers.size_bytes = int(float(value))
        elif name == "rate" and value is not None and float(value) > 0:
            markers.rate_bytes_per_s = float(value)
        elif name == "expired" and value is None:
            markers.expired = True
        else:
            raise _invalid(f"unknown simulator marker {match[0]}")
    return markers


@dataclass
class Operation:
    """One simulated generation."""

    id: str
    name: str
    flavour: str  # "gemini" or "vertex"
    prompt: str
    markers: Markers
    created_s: float
    ready_s: float
    outcome: str  # "video", "safety" or "error"
    error_code: int
    width: int
    height: int
    duration_s: int
    audio: bool
    sample_count: int
    storage_uri: str | None
    file_id: str


class Simulator:
    """The state behind the app: operations, files, counters, fault draws."""

    def __init__(self, settings: Settings) -> None:
        self.config: SimulatorSettings = settings.simulator
        cfg = self.config
        request_rates = (
            cfg.fault_429_rate
            + cfg.fault_500_rate
            + cfg.fault_503_rate
            + cfg.fault_slow_rate
            + cfg.fault_malformed_rate
            + cfg.fault_drop_rate
        )
        if request_rates > 1:
            raise ConfigError(
                "simulator: the fault_*_rate settings add up to more than 1"
            )
        if cfg.operation_error_rate + cfg.safety_filter_rate > 1:
            raise ConfigError(
                "simulator: operation_error_rate + safety_filter_rate is more than 1"
            )
        self.models = set(cfg.models or settings.pricing)
        self.retired = set(cfg.retired_models)
        self._rng = random.Random(cfg.fault_seed)
        self._secret = secrets.token_bytes(16)
        self.operations: dict[str, Operation] = {}
        self.files: dict[str, Operation] = {}
        self.objects: dict[tuple[str, str], Operation] = {}
        self.issued_tokens: set[str] = set()
        self.submissions: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self._marker_hits: Counter[tuple[str, str, str]] = Counter()

    def reset(self) -> None:
        """Forget operations, files and every count (the seed goes on)."""
        self.operations.clear()
        self.files.clear()
        self.objects.clear()
        self.submissions.clear()
        self.requests.clear()
        self.faults.clear()
        self._marker_hits.clear()

    def stats(self) -> dict[str, Any]:
        """What the admin route shows: submissions, requests, faults."""
        return {
            "submissions": {
                "total": sum(self.submissions.values()),
                "byPrompt": dict(self.submissions),
            },
            "requests": {
                stage: self.requests[stage] for stage in (*STAGES, "redirect")
            },
            "faults": dict(self.faults),
            "operations": len(self.operations),
        }

    # -- faults ------------------------------------------------------------------

    def draw_fault(self, stage: str, prompt: str | None, *, json: bool) -> str | None:
        """The fault to inject into this request, if any (markers first)."""
        if prompt is not None:
            markers = parse_markers(prompt)
            for (name, at), count in markers.faults.items():
                key = (prompt, name, at)
                if at == stage and self._marker_hits[key] < count:
                    self._marker_hits[key] += 1
                    self.faults[name] += 1
                    return name
        cfg = self.config
        rates = [
            ("429", cfg.fault_429_rate),
            ("500", cfg.fault_500_rate),
            ("503", cfg.fault_503_rate),
            ("slow", cfg.fault_slow_rate),
            ("malformed", cfg.fault_malformed_rate if json else 0.0),
            ("drop", cfg.fault_drop_rate if stage == "download" else 0.0),
        ]
        if not any(rate for _, rate in rates):
            return None
        # One draw per request whatever the stage, so that a seed replays.
        draw = self._rng.random()
        for name, rate in rates:
            if draw < rate:
                self.faults[name] += 1
                return name
            draw -= rate
        return None

    def _draw_outcome(self, markers: Markers) -> tuple[str, int]:
        if markers.safety:
            return "safety", 0
        if markers.error_code is not None:
            return "error", markers.error_code
        cfg = self.config
        if cfg.operation_error_rate or cfg.safety_filter_rate:
            draw = self._rng.random()
            if draw < cfg.operation_error_rate:
                return "error", 13
            if draw < cfg.operation_error_rate + cfg.safety_filter_rate:
                return "safety", 0
        return "video", 0

    # -- operations ----------------------------------------------------------------

    def check_model(self, model: str, flavour: str) -> None:
        """404 as Google words it for a retired or an unknown model."""
        if model in self.retired:
            raise GoogleError(
                404,
                "NOT_FOUND",
                f"models/{model} is no longer available. Please use a newer"
                " model; see the deprecations page.",
            )
        if model not in self.models:
            version = "v1beta" if flavour == "gemini" else "v1"
            raise GoogleError(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version {version}, or is"
                " not supported for predictLongRunning.",
            )

    def create(
        self,
        *,
        flavour: str,
        name_prefix: str,
        prompt: str,
        markers: Markers,
        params: dict[str, Any],
    ) -> Operation:
        """Accept a submission: count it and start its operation."""
        cfg = self.config
        op_id = secrets.token_hex(8) if flavour == "gemini" else _uuid()
        now = time.monotonic()
        generation_s = (
            markers.generation_s
            if markers.generation_s is not None
            else cfg.generation_s
        )
        outcome, error_code = self._draw_outcome(markers)
        width, height = frame_size(
            params["aspectRatio"], params["resolution"], cfg.frame_short_side_px
        )
        operation = Operation(
            id=op_id,
            name=f"{name_prefix}/operations/{op_id}",
            flavour=flavour,
            prompt=prompt,
            markers=markers,
            created_s=now,
            ready_s=now + generation_s,
            outcome=outcome,
            error_code=error_code,
            width=width,
            height=height,
            duration_s=params["durationSeconds"],
            audio=params["generateAudio"],
            sample_count=params["sampleCount"],
            storage_uri=params.get("storageUri"),
            file_id=secrets.token_hex(6),
        )
        self._forget_expired(now)
        self.operations[operation.name] = operation
        self.files[operation.file_id] = operation
        if operation.storage_uri:
            bucket, _, prefix = operation.storage_uri.removeprefix("gs://").partition(
                "/"
            )
            for index in range(operation.sample_count):
                obj = f"{prefix.strip('/')}/{op_id}/sample_{index}.mp4".lstrip("/")
                self.objects[(bucket, obj)] = operation
        self.submissions[prompt] += 1
        log.info(
            "simulated generation %s accepted",
            operation.name,
            extra={"action": "veo3sim.submit", "operation": operation.name},
        )
        return operation

    def _forget_expired(self, now: float) -> None:
        horizon = now - self.config.retention_s
        for name, op in list(self.operations.items()):
            if op.ready_s < horizon:
                del self.operations[name]
                self.files.pop(op.file_id, None)
        for key, op in list(self.objects.items()):
            if op.ready_s < horizon:
                del self.objects[key]

    async def video(self, operation: Operation, *, padded: bool = True) -> PaddedVideo:
        """The operation's video; encoded in a thread on first use, cached.

        ``padded`` grows it to the size a ``[sim:bytes=N]`` marker asks for.
        """
        mp4 = await asyncio.to_thread(
            render_mp4,
            operation.width,
            operation.height,
            operation.duration_s,
            operation.audio,
        )
        return PaddedVideo(mp4, operation.markers.size_bytes if padded else None)

    def downloadable(self, operation: Operation | None) -> Operation:
        """``operation`` if its video can be downloaded now, else 404."""
        if (
            operation is None
            or operation.outcome != "video"
            or operation.markers.expired
            or time.monotonic() < operation.ready_s
            or time.monotonic() > operation.ready_s + self.config.retention_s
        ):
            raise GoogleError(404, "NOT_FOUND", "Requested entity was not found.")
        return operation

    # -- signed media URLs ----------------------------------------------------------

    def sign(self, file_id: str) -> str:
        """The token of the redirect URL for ``file_id``."""
        return hmac.new(self._secret, file_id.encode(), hashlib.sha256).hexdigest()[:32]

    def signed(self, file_id: str, token: str) -> bool:
        """Whether ``token`` was made by :meth:`sign` for ``file_id``."""
        return hmac.compare_digest(self.sign(file_id), token)


def _uuid() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


# -- request parsing ------------------------------------------------------------------


def _check_image(value: object, flavour: str, where: str) -> None:
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be an object")
    data = value.get("bytesBase64Encoded")
    if data is None and isinstance(value.get("inlineData"), dict):
        data = value["inlineData"].get("data")
    if data is None and "gcsUri" in value:
        if flavour == "gemini":
            raise _invalid(f"{where}.gcsUri is not supported by the Gemini API.")
        return
    if not isinstance(data, str) or not data:
        raise _invalid(f"{where} needs bytesBase64Encoded or inlineData.data")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{where}: invalid base64 image data") from None


def parse_request(body: object, flavour: str) -> tuple[str, dict[str, Any]]:
    """The prompt and normalised parameters of a ``predictLongRunning`` body."""
    if not isinstance(body, dict):
        raise _invalid("Invalid JSON payload received.")
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise _invalid("No instances in the request.")
    instance = instances[0]
    if not isinstance(instance, dict):
        raise _invalid("instances[0] must be an object")
    prompt = instance.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("instances[0].prompt is required.")
    has_image = "image" in instance
    for key in ("image", "lastFrame"):
        if key in instance:
            _check_image(instance[key], flavour, f"instances[0].{key}")
    if "lastFrame" in instance and not has_image:
        raise _invalid("lastFrame needs image.")

    raw = body.get("parameters") or {}
    if not isinstance(raw, dict):
        raise _invalid("parameters must be an object")
    aspect = raw.get("aspectRatio", "16:9")
    if aspect not in ("16:9", "9:16"):
        raise _invalid(f"aspectRatio {aspect!r} is not supported; use 16:9 or 9:16.")
    resolution = raw.get("resolution", "720p")
    if resolution not in ("720p", "1080p", "4k"):
        raise _invalid(f"resolution {resolution!r} is not supported.")
    duration = raw.get("durationSeconds", 8)
    if isinstance(duration, str) and duration.isdigit():
        duration = int(duration)
    if duration not in (4, 6, 8) or isinstance(duration, bool):
        raise _invalid(f"durationSeconds {duration!r} is not supported; use 4, 6 or 8.")
    if resolution != "720p" and duration != 8:
        raise _invalid(f"resolution {resolution} needs durationSeconds 8.")
    count = raw.get("sampleCount", raw.get("numberOfVideos", 1))
    limit = 1 if flavour == "gemini" else 4
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= limit:
        raise _invalid(f"sampleCount must be between 1 and {limit}.")
    audio = raw.get("generateAudio", True)
    if not isinstance(audio, bool):
        raise _invalid("generateAudio must be a boolean.")
    negative = raw.get("negativePrompt")
    if negative is not None and not isinstance(negative, str):
        raise _invalid("negativePrompt must be a string.")
    person = raw.get("personGeneration")
    if person is not None:
        allowed = (
            ({"allow_adult"} if has_image else {"allow_all"})
            if flavour == "gemini"
            else {"allow_adult", "dont_allow", "allow_all"}
        )
        if person not in allowed:
            raise _invalid(f"personGeneration {person!r} is not allowed here.")
    storage = raw.get("storageUri")
    if storage is not None:
        if flavour == "gemini":
            raise _invalid("storageUri is not supported by the Gemini API.")
        if not isinstance(storage, str) or not re.match(r"^gs://[^/]+", storage):
            raise _invalid("storageUri must be a gs:// URI.")
    return prompt, {
        "aspectRatio": aspect,
        "resolution": resolution,
        "durationSeconds": duration,
        "sampleCount": count,
        "generateAudio": audio,
        "storageUri": storage,
    }


async def _json_body(request: Request) -> object:
    try:
        return msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        raise _invalid("Invalid JSON payload received.") from None


# -- the app ------------------------------------------------------------------------


def create_simulator_app(settings: Settings) -> Starlette:
    """The simulator as an ASGI app; its state is ``app.state.simulator``.

    Does not listen anywhere by itself: run it with :class:`SimulatorServer`,
    ``nimu-rt veo3-sim`` or any ASGI server. Raises ConfigError when the
    fault rates add up to more than 1.
    """
    sim = Simulator(settings)
    cfg = sim.config

    def check_key(request: Request) -> None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            raise GoogleError(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without"
                " established identity). Please use API Key or other form of API"
                " consumer identity to call this API.",
            )
        if cfg.api_key and not hmac.compare_digest(key, cfg.api_key):
            raise GoogleError(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                    }
                ],
            )

    def check_bearer(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise GoogleError(
                401,
                "UNAUTHENTICATED",
                "Request is missing required authentication credential. Expected"
                " OAuth 2 access token.",
            )
        if cfg.api_key and token != cfg.api_key and token not in sim.issued_tokens:
            raise GoogleError(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
            )

    def before_fault(fault: str | None) -> None:
        """Faults that refuse the request before anything happens."""
        if fault == "429":
            delay = cfg.retry_delay_s
            raise GoogleError(
                429,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and"
                " billing details.\n* Quota exceeded for metric:"
                " generativelanguage.googleapis.com/"
                f"predict_long_running_requests_per_model\nPlease retry in {delay}s.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/"
                                "predict_long_running_requests_per_model",
                                "quotaId": "PredictLongRunningRequestsPerMinute",
                            }
                        ],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": f"{delay:g}s",
                    },
                ],
                headers={"Retry-After": str(max(0, round(delay)))},
            )
        if fault == "503":
            raise GoogleError(
                503, "UNAVAILABLE", "The service is currently unavailable."
            )

    async def after_fault(fault: str | None, request: Request, doc: object) -> Response:
        """Faults that hit after the work was done (the answer is lost)."""
        if fault == "500":
            return GoogleError(
                500, "INTERNAL", "Internal error encountered."
            ).response()
        if fault == "slow":
            await _hold(request, cfg.slow_s)
        encoded = msgspec.json.encode(doc)
        if fault == "malformed":
            encoded = encoded[: max(1, len(encoded) // 2)]
        return Response(encoded, media_type="application/json; charset=UTF-8")

    # -- Gemini ---------------------------------------------------------------

    async def gemini_submit(request: Request) -> Response:
        sim.requests["submit"] += 1
        check_key(request)
        model = request.path_params["model"]
        body = await _json_body(request)
        sim.check_model(model, "gemini")
        prompt, params = parse_request(body, "gemini")
        markers = parse_markers(prompt)
        fault = sim.draw_fault("submit", prompt, json=True)
        before_fault(fault)
        op = sim.create(
            flavour="gemini",
            name_prefix=f"models/{model}",
            prompt=prompt,
            markers=markers,
            params=params,
        )
        return await after_fault(fault, request, {"name": op.name})

    async def gemini_poll(request: Request) -> Response:
        sim.requests["poll"] += 1
        check_key(request)
        name = (
            f"models/{request.path_params['model']}/operations/"
            + (request.path_params["op"])
        )
        op = sim.operations.get(name)
        fault = sim.draw_fault("poll", op.prompt if op else None, json=True)
        before_fault(fault)
        if op is None:
            raise GoogleError(404, "NOT_FOUND", f"Operation {name} not found.")
        doc = await operation_doc(request, op)
        return await after_fault(fault, request, doc)

    async def operation_doc(request: Request, op: Operation) -> dict[str, Any]:
        if time.monotonic() < op.ready_s:
            return {"name": op.name}
        doc: dict[str, Any] = {"name": op.name, "done": True}
        if op.outcome == "error":
            doc["error"] = {
                "code": op.error_code,
                "message": f"Video generation failed"
                f" ({_GRPC_NAMES.get(op.error_code, 'UNKNOWN')}).",
            }
            return doc
        rai_count = op.sample_count if op.outcome == "safety" else 0
        reasons = [_SAFETY_REASON] if op.outcome == "safety" else []
        if op.flavour == "gemini":
            inner: dict[str, Any] = {}
            if op.outcome == "video":
                base = str(request.base_url).rstrip("/")
                uri = f"{base}/v1beta/files/{op.file_id}:download?alt=media"
                inner["generatedSamples"] = [{"video": {"uri": uri}}]
            else:
                inner["raiMediaFilteredCount"] = rai_count
                inner["raiMediaFilteredReasons"] = reasons
            doc["response"] = {
                "@type": _GEMINI_RESPONSE_TYPE,
                "generateVideoResponse": inner,
            }
            return doc
        response: dict[str, Any] = {
            "@type": _VERTEX_RESPONSE_TYPE,
            "raiMediaFilteredCount": rai_count,
        }
        if reasons:
            response["raiMediaFilteredReasons"] = reasons
        if op.outcome == "video":
            videos = []
            if op.storage_uri:
                prefix = op.storage_uri.rstrip("/")
                for index in range(op.sample_count):
                    videos.append(
                        {
                            "gcsUri": f"{prefix}/{op.id}/sample_{index}.mp4",
                            "mimeType": "video/mp4",
                        }
                    )
            else:
                # Inline answers carry the plain MP4: [sim:bytes] is for
                # downloads, and would put the whole padding in memory here.
                video = await sim.video(op, padded=False)
                data = b"".join(video.iter_range(0, video.size_bytes))
                encoded = base64.b64encode(data).decode("ascii")
                videos = [
                    {"bytesBase64Encoded": encoded, "mimeType": "video/mp4"}
                ] * op.sample_count
            response["videos"] = videos
        doc["response"] = response
        return doc

    async def gemini_download(request: Request) -> Response:
        check_key(request)
        op = sim.files.get(request.path_params["file_id"])
        sim.downloadable(op)
        assert op is not None
        if cfg.redirect_downloads:
            sim.requests["redirect"] += 1
            token = sim.sign(op.file_id)
            base = str(request.base_url).rstrip("/")
            return RedirectResponse(
                f"{base}/_sim/media/{op.file_id}?token={token}", status_code=302
            )
        return await serve_video(request, op)

    async def media(request: Request) -> Response:
        op = sim.files.get(request.path_params["file_id"])
        if op is None or not sim.signed(
            op.file_id, request.query_params.get("token", "")
        ):
            raise GoogleError(403, "PERMISSION_DENIED", "The signature is not valid.")
        return await serve_video(request, sim.downloadable(op))

    async def serve_video(request: Request, op: Operation) -> Response:
        sim.requests["download"] += 1
        fault = sim.draw_fault("download", op.prompt, json=False)
        before_fault(fault)
        if fault == "500":
            raise GoogleError(500, "INTERNAL", "Internal error encountered.")
        if fault == "slow":
            await _hold(request, cfg.slow_s)
        video = await sim.video(op)
        return RangeVideoResponse(
            video,
            request.headers.get("range"),
            drop=fault == "drop",
            rate_bytes_per_s=op.markers.rate_bytes_per_s,
        )

    # -- Vertex -----------------------------------------------------------------

    async def vertex_action(request: Request) -> Response:
        params = request.path_params
        model_resource = (
            f"projects/{params['project']}/locations/{params['location']}"
            f"/publishers/google/models/{params['model']}"
        )
        action = params["action"]
        if action == "predictLongRunning":
            return await vertex_submit(request, model_resource, params["model"])
        if action == "fetchPredictOperation":
            return await vertex_poll(request, model_resource)
        raise GoogleError(404, "NOT_FOUND", f"Method {action} not found.")

    async def vertex_submit(request: Request, resource: str, model: str) -> Response:
        sim.requests["submit"] += 1
        check_bearer(request)
        body = await _json_body(request)
        sim.check_model(model, "vertex")
        prompt, params = parse_request(body, "vertex")
        markers = parse_markers(prompt)
        fault = sim.draw_fault("submit", prompt, json=True)
        before_fault(fault)
        op = sim.create(
            flavour="vertex",
            name_prefix=resource,
            prompt=prompt,
            markers=markers,
            params=params,
        )
        return await after_fault(fault, request, {"name": op.name})

    async def vertex_poll(request: Request, resource: str) -> Response:
        sim.requests["poll"] += 1
        check_bearer(request)
        body = await _json_body(request)
        name = body.get("operationName") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise _invalid("operationName is required.")
        op = sim.operations.get(name)
        fault = sim.draw_fault("poll", op.prompt if op else None, json=True)
        before_fault(fault)
        if op is None or not name.startswith(resource + "/operations/"):
            raise GoogleError(404, "NOT_FOUND", f"Operation {name} not found.")
        doc = await operation_doc(request, op)
        return await after_fault(fault, request, doc)

    async def gcs_object(request: Request) -> Response:
        check_bearer(request)
        key = (
            request.path_params["bucket"],
            unquote(request.path_params["object"]),
        )
        op = sim.objects.get(key)
        if op is None:
            raise GoogleError(404, "NOT_FOUND", "No such object.")
        return await serve_video(request, sim.downloadable(op))

    async def oauth_token(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        assertion = (form.get("assertion") or [""])[0]
        grant_type = (form.get("grant_type") or [""])[0]
        if grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return Response(
                msgspec.json.encode({"error": "unsupported_grant_type"}),
                status_code=400,
                media_type="application/json",
            )
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            claims = {}
        if not claims.get("iss") or "scope" not in claims:
            return Response(
                msgspec.json.encode(
                    {"error": "invalid_grant", "error_description": "bad assertion"}
                ),
                status_code=400,
                media_type="application/json",
            )
        token = "sim-" + secrets.token_urlsafe(16)
        sim.issued_tokens.add(token)
        return Response(
            msgspec.json.encode(
                {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
            ),
            media_type="application/json",
        )

    # -- administration -----------------------------------------------------------

    async def stats(request: Request) -> Response:
        return Response(msgspec.json.encode(sim.stats()), media_type="application/json")

    async def reset(request: Request) -> Response:
        sim.reset()
        return Response(status_code=204)

    async def google_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GoogleError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            error = GoogleError(405, "UNIMPLEMENTED", "Method not allowed.")
        else:
            error = GoogleError(
                404, "NOT_FOUND", f"The requested URL {request.url.path} was not found."
            )
        return error.response()

    vertex_model = (
        "/{version:str}/projects/{project:str}/locations/{location:str}"
        "/publishers/google/models/{model:str}:{action:str}"
    )
    app = Starlette(
        routes=[
            Route(
                "/v1beta/models/{model:str}:predictLongRunning",
                gemini_submit,
                methods=["POST"],
            ),
            Route(
                "/v1beta/models/{model:str}/operations/{op:str}",
                gemini_poll,
                methods=["GET"],
            ),
            Route(
                "/v1beta/files/{file_id:str}:download", gemini_download, methods=["GET"]
            ),
            Route("/_sim/media/{file_id:str}", media, methods=["GET"]),
            Route(vertex_model, vertex_action, methods=["POST"]),
            Route(
                "/storage/v1/b/{bucket:str}/o/{object:path}",
                gcs_object,
                methods=["GET"],
            ),
            Route("/_sim/oauth2/token", oauth_token, methods=["POST"]),
            Route("/_sim/stats", stats, methods=["GET"]),
            Route("/_sim/reset", reset, methods=["POST"]),
        ],
        exception_handlers={GoogleError: google_error, HTTPException: http_error},
    )
    app.state.simulator = sim
    return app


async def _hold(request: Request, seconds: float) -> None:
    """Wait ``seconds``, or less if the client hangs up first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeVideoResponse(Response):
    """A video body honouring one ``Range``; with ``drop``, the connection is
    closed halfway through the body, as a network failure would."""

    def __init__(
        self,
        video: PaddedVideo,
        range_header: str | None,
        *,
        drop: bool,
        rate_bytes_per_s: float | None = None,
    ):
        super().__init__(media_type="video/mp4")
        self._rate = rate_bytes_per_s
        size = video.size_bytes
        start, end = 0, size
        self.status_code = 200
        match = _RANGE.match((range_header or "").replace(" ", ""))
        if match and (match[1] or match[2]):
            if match[1]:
                start = int(match[1])
                end = min(size, int(match[2]) + 1) if match[2] else size
            else:
                start = max(0, size - int(match[2]))
            if start >= size or start >= end:
                self.status_code = 416
                start, end = 0, 0
                self.headers["content-range"] = f"bytes */{size}"
            else:
                self.status_code = 206
                self.headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        self.headers["accept-ranges"] = "bytes"
        self.headers["content-length"] = str(end - start)
        self._video = video
        self._start = start
        self._end = end
        self._drop = drop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": self.raw_headers,
            }
        )
        stop = self._end
        if self._drop:
            stop = self._start + (self._end - self._start) // 2
        for chunk in self._video.iter_range(self._start, stop, _BODY_CHUNK_BYTES):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if self._rate:
                await asyncio.sleep(len(chunk) / self._rate)
        if self._drop:
            # Returning without the final body message makes the server
            # close the connection mid-body: what the client must survive.
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class SimulatorServer:
    """The simulator under uvicorn on a loopback port, in this event loop.

    ``start()`` returns the base URL once the server accepts connections;
    ``stop()`` shuts it down (bounded) and is safe to call twice. Does not
    install signal handlers: the process's own server keeps them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.app = create_simulator_app(settings)
        self._host = host
        self._port = port
        self._start_timeout_s = start_timeout_s
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.base_url = ""

    @property
    def simulator(self) -> Simulator:
        """The served simulator's state (counts, operations)."""
        return self.app.state.simulator  # type: ignore[no-any-return]

    async def start(self) -> str:
        """Listen and serve; the base URL, e.g. ``http://127.0.0.1:40123``."""
        if self._task is not None:
            return self.base_url
        sock = listening_socket(self._host, self._port)
        self._socket = sock
        port = sock.getsockname()[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.base_url = f"http://{host}:{port}"
        server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._server = server
        self._task = asyncio.create_task(
            server.serve(sockets=[sock]), name="veo3-simulator"
        )
        try:
            async with asyncio.timeout(self._start_timeout_s):
                while not server.started:
                    if self._task.done():
                        raise RuntimeError("the Veo 3 simulator failed to start")
                    await asyncio.sleep(0.005)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "Veo 3 simulator listening on %s",
            self.base_url,
            extra={"action": "veo3sim.start"},
        )
        return self.base_url

    async def wait(self) -> None:
        """Return when the server has stopped (by stop() or a failure)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop serving; safe to call twice."""
        task, server, sock = self._task, self._server, self._socket
        self._task = self._server = self._socket = None
        if task is not None and server is not None:
            server.should_exit = True
            try:
                async with asyncio.timeout(self._start_timeout_s):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            except SystemExit:
                # uvicorn exits this way when startup failed; already reported.
                pass
        if sock is not None:
            sock.close()
