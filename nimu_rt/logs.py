"""Log output: structured JSON lines or plain text, through stdlib logging.

Records carry a stable ``action`` (e.g. ``generation.create``) and the ids a
person greps for (``request_id``, ``generation_id``, ``job_id``,
``user_id``, ``conn_id``) as ``extra`` fields. The level policy is written in
the README.

Ids that hold for a whole request, connection or job are bound once with
:func:`bind` (a context variable, so every record logged by that task, and
by the tasks it starts, carries them) instead of being passed to each call.
An ``extra`` given at the call wins over a bound id of the same name.

Whatever a record says, the formatters replace anything shaped like a JWT
or a bearer credential before the line is written: tokens must never reach
the logs, even through a library's error message.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import msgspec

from nimu_rt.config import LoggingSettings

# Attributes every LogRecord has; anything else came from ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    # uvicorn adds an ANSI-coloured copy of its message.
    "color_message",
}
_encode = msgspec.json.Encoder().encode

# The ids bound to the running task; copied into every record it logs.
_bound: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar(
    "nimu_log_ids", default={}
)

# Three base64url segments starting with '{"' (eyJ): a JWT, signed or not;
# and whatever follows "Bearer " in a header that found its way into text.
_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?"
    r"|(?<=[Bb]earer )[A-Za-z0-9._~+/=-]{8,}"
)
REDACTED = "[redacted]"


def bind(**ids: Any) -> contextvars.Token[dict[str, Any]]:
    """Add ids to every record the current task (and its children) logs.

    None values are skipped. Returns a token for :func:`unbind`; a request
    or connection that binds ids unbinds them when it ends.
    """
    merged = {**_bound.get(), **{k: v for k, v in ids.items() if v is not None}}
    return _bound.set(merged)


def unbind(token: contextvars.Token[dict[str, Any]]) -> None:
    """Restore the ids bound before the matching :func:`bind`."""
    _bound.reset(token)


@contextmanager
def bound(**ids: Any) -> Iterator[None]:
    """:func:`bind` for the duration of a ``with`` block."""
    token = bind(**ids)
    try:
        yield
    finally:
        _bound.reset(token)


def fresh_context(**ids: Any) -> contextvars.Context:
    """A context for a new long-lived task that carries exactly ``ids``.

    A task inherits the context of whoever created it: a job actor started
    while a request was being answered would otherwise log that request's
    id for its whole life.
    """
    context = contextvars.copy_context()
    context.run(_bound.set, {k: v for k, v in ids.items() if v is not None})
    return context


def redact(text: str) -> str:
    """``text`` with JWTs and bearer credentials replaced."""
    return _SECRETS.sub(REDACTED, text)


class ContextFilter(logging.Filter):
    """Copies the bound ids into each record that does not set them itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _bound.get().items():
            if name not in record.__dict__:
                setattr(record, name, value)
        return True


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got through ``extra`` (or bound ids)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(extras(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return redact(_encode(doc).decode())


class TextFormatter(logging.Formatter):
    """Readable lines with the extras appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        found = extras(record)
        if found:
            line += " " + " ".join(f"{k}={v}" for k, v in found.items())
        return redact(line)


def make_handler(
    settings: LoggingSettings, stream: IO[str] | None = None
) -> logging.Handler:
    """A handler writing to ``stream`` (stderr) in the configured format,
    with the bound ids added to every record."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if settings.format == "json" else TextFormatter()
    )
    handler.addFilter(ContextFilter())
    return handler


def configure(settings: LoggingSettings) -> None:
    """Send the service's logs to stderr in the configured format."""
    root = logging.getLogger()
    root.handlers[:] = [make_handler(settings)]
    root.setLevel(settings.level)
    # uvicorn's own access log would repeat our http.request lines.
    logging.getLogger("uvicorn.access").disabled = True
