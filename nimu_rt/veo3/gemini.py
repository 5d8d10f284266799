"""Veo 3 on Google's Gemini API (``generativelanguage.googleapis.com``).

Submit ``POST /v1beta/models/{model}:predictLongRunning``, poll
``GET /v1beta/{operation name}``, download the ``video.uri`` of the result;
every request carries the API key in ``x-goog-api-key``.

Google has published shutdown dates for every Veo model on this API; a
retired model answers 404 (``veo3_model_unavailable``). Keep the model
configurable and prefer Vertex AI for production.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import quote, urlsplit

from nimu_rt.config import Settings
from nimu_rt.errors import SafetyFiltered, Veo3Final, Veo3Retryable
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
from nimu_rt.veo3.transport import (
    HttpVeo3Client,
    Stage,
    decode_inline,
    operation_error,
)

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
_OPERATION_NAME = re.compile(r"^models/[A-Za-z0-9._-]+/operations/[A-Za-z0-9._-]+$")


class GeminiClient(HttpVeo3Client):
    """The Gemini API flavour of :class:`~nimu_rt.veo3.client.Veo3Client`.

    Always generates audio (the API has no switch: ``validate_prompt``
    reports a silent request). Sends ``durationSeconds`` as an integer, as
    Google's SDK does, and never ``seed`` or ``generateAudio``, which the SDK
    refuses on this API. The API key is sent with downloads only when the
    video URI is on the API's own host; Google's redirect is followed with
    it, as Google's own download recipe does.
    """

    provider = "gemini"
    # Whether parameters carry generateAudio; the Gemini API has no switch.
    audio_switch = False

    def __init__(
        self,
        settings: Settings,
        *,
        api_key: str,
        base_url: str = GEMINI_BASE_URL,
        typical_generation_s: float | None = None,
    ) -> None:
        super().__init__(
            settings, base_url=base_url, typical_generation_s=typical_generation_s
        )
        if not api_key:
            raise ValueError("the Gemini API needs an API key")
        self._api_key = api_key

    async def _auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self._api_key}

    def _download_request(self, uri: str) -> tuple[str, bool]:
        target = urlsplit(uri)
        if target.scheme not in ("http", "https"):
            raise Veo3Final(
                f"cannot download {target.scheme}:// videos from the Gemini API",
                code=codes.UNSUPPORTED,
            )
        own = urlsplit(self.base_url)
        same_origin = (target.scheme, target.netloc) == (own.scheme, own.netloc)
        return uri, same_origin

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
        url = f"{self.base_url}/v1beta/models/{quote(options.model, safe='')}"
        doc = await self._call_json(
            "submit",
            "POST",
            url + ":predictLongRunning",
            body=request_body(
                prompt, options, image=image, audio_switch=self.audio_switch
            ),
        )
        return _operation_name(doc, "submit")

    async def poll(self, operation_name: str) -> PollResult:
        """The operation's state: Running, Succeeded with the video URI, or
        Failed with the error or the safety verdict (reasons included)."""
        if not _OPERATION_NAME.match(operation_name):
            raise Veo3Final(
                f"{operation_name!r} is not a Gemini operation name",
                code=codes.OPERATION_NOT_FOUND,
            )
        doc = await self._call_json(
            "poll",
            "GET",
            f"{self.base_url}/v1beta/{operation_name}",
            operation_name=operation_name,
        )
        return parse_operation(doc, operation_name)


def request_body(
    prompt: str,
    options: GenerationOptions,
    *,
    image: ImageInput | None,
    audio_switch: bool,
    storage_uri: str | None = None,
) -> dict[str, Any]:
    """The ``predictLongRunning`` body shared by both providers.

    ``audio_switch`` adds ``generateAudio`` (Vertex only); ``storage_uri``
    asks Vertex to write the video to Cloud Storage instead of inline.
    """
    instance: dict[str, Any] = {"prompt": prompt}
    if image is not None:
        instance["image"] = {
            "bytesBase64Encoded": base64.b64encode(image.data).decode("ascii"),
            "mimeType": image.mime_type,
        }
    parameters: dict[str, Any] = {
        "aspectRatio": options.aspect_ratio,
        "resolution": options.resolution,
        "durationSeconds": options.duration_seconds,
        "sampleCount": 1,
    }
    if options.negative_prompt:
        parameters["negativePrompt"] = options.negative_prompt
    if audio_switch:
        parameters["generateAudio"] = options.generate_audio
    if storage_uri:
        parameters["storageUri"] = storage_uri
    return {"instances": [instance], "parameters": parameters}


def _operation_name(doc: dict[str, Any], stage: Stage) -> str:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        # The submit was answered 200, so the operation exists: this is as
        # ambiguous as a lost answer.
        raise Veo3Retryable(
            "Veo 3 accepted the request but its answer has no operation name",
            code=codes.SUBMIT_AMBIGUOUS if stage == "submit" else codes.BAD_RESPONSE,
        )
    return name


def parse_operation(doc: dict[str, Any], operation_name: str) -> PollResult:
    """A Gemini operation document as a PollResult.

    A missing ``done`` means running (proto3 JSON omits false). Safety
    fields are read inside ``generateVideoResponse`` and, for tolerance,
    directly under ``response``.
    """
    name = str(doc.get("name") or operation_name)
    if not doc.get("done"):
        return Running(name=name)
    if doc.get("error") is not None:
        return Failed(name=name, error=operation_error(doc["error"]))
    response = doc.get("response") if isinstance(doc.get("response"), dict) else {}
    inner = response.get("generateVideoResponse")
    inner = inner if isinstance(inner, dict) else {}
    samples = inner.get("generatedSamples")
    for sample in samples if isinstance(samples, list) else []:
        video = sample.get("video") if isinstance(sample, dict) else None
        if not isinstance(video, dict):
            continue
        if isinstance(video.get("uri"), str) and video["uri"]:
            return Succeeded(
                name=name,
                video=VideoRef(
                    uri=video["uri"],
                    mime_type=str(video.get("encoding") or "video/mp4"),
                ),
            )
        inline = decode_inline(video.get("encodedVideo"), video.get("encoding"))
        if inline is not None:
            return Succeeded(name=name, video=inline)
    return Failed(name=name, error=no_video_error(inner, response))


def no_video_error(*sources: dict[str, Any]) -> SafetyFiltered | Veo3Final:
    """Why a done operation has no video: the safety verdict when given."""
    for source in sources:
        count = source.get("raiMediaFilteredCount")
        reasons = source.get("raiMediaFilteredReasons")
        if (isinstance(count, int) and count > 0) or reasons:
            texts = [str(r) for r in reasons] if isinstance(reasons, list) else []
            return SafetyFiltered(texts, count if isinstance(count, int) else 1)
    return Veo3Final(
        "Veo 3 finished without a video and without saying why",
        code=codes.NO_VIDEO,
    )
