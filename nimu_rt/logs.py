"""Log output: structured JSON lines or plain text, through stdlib logging.

Records carry a stable ``action`` (e.g. ``generation.create``) and the ids a
person greps for (``request_id``, ``generation_id``, ``job_id``,
``user_id``, ``conn_id``) as ``extra`` fields. The level policy is written in
the README.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

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


def extras(record: logging.LogRecord) -> dict[str, Any]:
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
        return _encode(doc).decode()


class TextFormatter(logging.Formatter):
    """Readable lines with the extras appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        found = extras(record)
        if found:
            line += " " + " ".join(f"{k}={v}" for k, v in found.items())
        return line


def configure(settings: LoggingSettings) -> None:
    """Send the service's logs to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if settings.format == "json" else TextFormatter()
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # uvicorn's own access log would repeat our http.request lines.
    logging.getLogger("uvicorn.access").disabled = True
