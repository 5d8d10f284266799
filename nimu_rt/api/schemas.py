"""Request bodies of the REST API and the checks msgspec cannot express.

Every body is decoded by msgspec with unknown fields forbidden, so a typo in
a field name is an error rather than a silently ignored option. Text fields
are then checked by :func:`check_text`: trimmed length and no control
characters (a prompt reaches Veo 3 and log lines; a stray escape sequence in
either does harm).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated

from msgspec import Meta, Struct

from nimu_rt.lifecycle import Status
from nimu_rt.models import AspectRatio, DurationSeconds, Resolution


class Body(Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies."""


class CreateGenerationBody(Body, kw_only=True):
    """The body of ``POST /api/generations``; omitted options take defaults."""

    prompt: str
    model: str | None = None
    aspect_ratio: AspectRatio | None = None
    resolution: Resolution | None = None
    duration_seconds: DurationSeconds | None = None
    negative_prompt: str | None = None
    generate_audio: bool | None = None
    reference_image_key: str | None = None
    conversation_id: str | None = None


class ClarifyBody(Body, kw_only=True):
    """The body of ``POST .../clarify``: one answer per question id."""

    answers: dict[str, str]


class ConfirmBody(Body, kw_only=True):
    """The body of ``POST .../confirm``."""

    # The price the user saw and accepted; refused if below the estimate.
    accepted_cost_usd: Annotated[float, Meta(ge=0)]


class ErrorBody(Body, kw_only=True):
    """An operator's failure reason, shown to the user."""

    code: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    message: str
    retryable: bool = False


class StatusOverrideBody(Body, kw_only=True):
    """The body of ``PUT .../status``."""

    status: Status
    reason: str | None = None
    # Only with status "failed": what the user is told.
    error: ErrorBody | None = None


# Characters refused in free text: C0 and C1 controls except tab and line
# breaks, and the bidirectional overrides that make text read differently
# from how it is stored.
_BIDI = {"\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067",
         "\u2068", "\u2069"}
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def check_text(
    path: str,
    value: str,
    *,
    max_chars: int,
    min_chars: int = 1,
    multiline: bool = True,
) -> tuple[str, list[dict[str, str]]]:
    """Trim ``value`` and return it with the problems found (JSON paths)."""
    problems = []
    text = value.strip()
    for ch in text:
        if ch in _BIDI or (
            unicodedata.category(ch) == "Cc"
            and (ch not in _ALLOWED_CONTROLS or not multiline)
        ):
            problems.append(
                {
                    "path": path,
                    "message": f"contains the control character U+{ord(ch):04X}",
                }
            )
            break
    if len(text) < min_chars:
        problems.append(
            {
                "path": path,
                "message": "must not be empty"
                if min_chars == 1
                else f"must be at least {min_chars} characters",
            }
        )
    elif len(text) > max_chars:
        problems.append(
            {
                "path": path,
                "message": f"must be at most {max_chars} characters after trimming"
                f" (got {len(text)})",
            }
        )
    return text, problems


_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]{1,255}$")


def check_token(path: str, value: str) -> list[dict[str, str]]:
    """Opaque client tokens (ids, keys): 1-255 printable ASCII, no spaces."""
    if _TOKEN_CHARS.match(value):
        return []
    return [{"path": path, "message": "must be 1-255 printable ASCII characters"}]
