"""What Veo 3 would refuse, found before a paid request is sent.

The create and clarify routes use :func:`option_problems` and
:func:`model_problems` to refuse such a request at once, with the JSON path
of the field; the Veo 3 client's ``validate_prompt`` reports the same rules
as readable lines.
"""

from __future__ import annotations

import math

from nimu_rt.api.schemas import check_text
from nimu_rt.config import Settings
from nimu_rt.models import GenerationOptions

# Veo 3's text input limit per Google's model cards. The tokenizer is not
# public, so prompt length is estimated (see estimated_tokens).
MAX_PROMPT_TOKENS = 1024


def estimated_tokens(text: str) -> int:
    """A generous estimate of how many tokens Veo 3 counts in ``text``.

    About four ASCII characters make a token in English; other scripts
    (Chinese, Japanese, emoji) are counted as one token per character, which
    over-counts rather than under-counts. An estimate, not the real count.
    """
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return math.ceil(ascii_chars / 4) + (len(text) - ascii_chars)


def prompt_problems(
    settings: Settings, prompt: str, options: GenerationOptions, *, provider: str
) -> list[str]:
    """Readable problems with ``prompt`` and ``options``; empty when none.

    Each item reads ``"<field>: <problem>"`` with the request's camelCase
    field name. Covers empty or over-long text, control characters, option
    combinations the model refuses and, on the Gemini API, a silent video
    (it always generates audio). Does not guarantee that Veo 3 accepts the
    prompt: its safety filters only answer after generating.
    """
    limits = settings.generations
    found = []
    _, problems = check_text("$.prompt", prompt, max_chars=limits.max_prompt_chars)
    found += problems
    if options.negative_prompt is not None:
        _, problems = check_text(
            "$.negativePrompt",
            options.negative_prompt,
            max_chars=limits.max_prompt_chars,
        )
        found += problems
    found += option_problems(settings, options)
    found += model_problems(prompt, options, provider=provider)
    return [f"{p['path'].removeprefix('$.')}: {p['message']}" for p in found]


def model_problems(
    prompt: str, options: GenerationOptions, *, provider: str
) -> list[dict[str, str]]:
    """What Veo 3 itself refuses beyond the request's own limits.

    A prompt over the model's token limit, and on the Gemini API a silent
    video (it always generates audio, and bills it). Items carry the JSON
    path of the request field, as the API's validation errors do.
    """
    found = []
    text = prompt.strip()
    if text and estimated_tokens(text) > MAX_PROMPT_TOKENS:
        found.append(
            {
                "path": "$.prompt",
                "message": f"is too long for Veo 3 (about {estimated_tokens(text)}"
                f" tokens, the model reads at most {MAX_PROMPT_TOKENS})",
            }
        )
    if provider == "gemini" and not options.generate_audio:
        found.append(
            {
                "path": "$.generateAudio",
                "message": "the Gemini API always generates audio; a silent video"
                " needs the Vertex AI provider",
            }
        )
    return found


def option_problems(
    settings: Settings, options: GenerationOptions
) -> list[dict[str, str]]:
    """Combinations the model refuses, found before anything is paid for."""
    problems = []
    rows = settings.pricing.get(options.model)
    if rows is None:
        known = ", ".join(sorted(settings.pricing))
        problems.append(
            {"path": "$.model", "message": f"unknown model; known: {known}"}
        )
    elif options.resolution not in rows:
        problems.append(
            {
                "path": "$.resolution",
                "message": f"{options.model} does not offer {options.resolution}",
            }
        )
    if options.resolution == "1080p" and options.duration_seconds != 8:
        problems.append(
            {"path": "$.durationSeconds", "message": "1080p needs durationSeconds 8"}
        )
    if options.reference_image_key and options.duration_seconds != 8:
        problems.append(
            {
                "path": "$.durationSeconds",
                "message": "image-to-video needs durationSeconds 8",
            }
        )
    return problems
