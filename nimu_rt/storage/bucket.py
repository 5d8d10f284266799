"""Bucket configuration written by ``nimu-rt setup-bucket``.

Two rules, each identified by an ID of ours so that running the command
again replaces them instead of adding copies, and rules someone else added
(in the dashboard, say) are kept:

- CORS (``nimu-rt``): the configured browser origins may GET, HEAD and PUT;
  ``Range`` may be sent (seeking in a ``<video>`` that uses fetch or MSE)
  and ``ETag``, ``Content-Range``, ``Content-Length`` and ``Accept-Ranges``
  may be read. Skipped when ``storage.cors_origins`` is empty.
- Lifecycle (``nimu-rt-abort-incomplete-uploads``): multipart uploads still
  unfinished ``storage.abort_incomplete_after_days`` after they started are
  aborted by R2, whatever happened to the instance that started them.

A configuration already as wanted is not written again.
"""

from __future__ import annotations

from typing import Any

from nimu_rt.config import StorageSettings
from nimu_rt.errors import NotFound, StorageError
from nimu_rt.storage.r2 import R2Storage

CORS_RULE_ID = "nimu-rt"
LIFECYCLE_RULE_ID = "nimu-rt-abort-incomplete-uploads"
_NO_CONFIG_CODES = ("NoSuchCORSConfiguration", "NoSuchLifecycleConfiguration")


def cors_rule(settings: StorageSettings) -> dict[str, Any]:
    """The CORS rule of ours for ``settings``."""
    return {
        "ID": CORS_RULE_ID,
        "AllowedOrigins": list(settings.cors_origins),
        "AllowedMethods": ["GET", "HEAD", "PUT"],
        "AllowedHeaders": ["Content-Type", "Range", "If-None-Match", "If-Match"],
        "ExposeHeaders": ["ETag", "Content-Range", "Content-Length", "Accept-Ranges"],
        "MaxAgeSeconds": 3600,
    }


def lifecycle_rule(settings: StorageSettings) -> dict[str, Any]:
    """The lifecycle rule of ours for ``settings``."""
    return {
        "ID": LIFECYCLE_RULE_ID,
        "Status": "Enabled",
        "Filter": {"Prefix": ""},
        "AbortIncompleteMultipartUpload": {
            "DaysAfterInitiation": settings.abort_incomplete_after_days
        },
    }


async def setup_bucket(storage: R2Storage) -> list[str]:
    """Apply the CORS and lifecycle rules; return one line per rule saying
    what was done (``updated``, ``unchanged`` or ``skipped``)."""
    settings = storage.settings
    report = []
    if settings.cors_origins:
        changed = await _merge_cors(storage, cors_rule(settings))
        report.append(
            f"cors: {'updated' if changed else 'unchanged'}"
            f" (origins {', '.join(settings.cors_origins)})"
        )
    else:
        report.append("cors: skipped (storage.cors_origins is empty)")
    changed = await _merge_lifecycle(storage, lifecycle_rule(settings))
    report.append(
        f"lifecycle: {'updated' if changed else 'unchanged'} (abort unfinished"
        f" uploads after {settings.abort_incomplete_after_days} days)"
    )
    return report


async def _merge_cors(storage: R2Storage, rule: dict[str, Any]) -> bool:
    current = await _get_rules(storage, "get_bucket_cors", "CORSRules")
    merged = _with_rule(current, rule)
    if _same(current, merged):
        return False
    await storage.request("put_bucket_cors", CORSConfiguration={"CORSRules": merged})
    return True


async def _merge_lifecycle(storage: R2Storage, rule: dict[str, Any]) -> bool:
    current = await _get_rules(
        storage, "get_bucket_lifecycle_configuration", "Rules"
    )
    merged = _with_rule(current, rule)
    if _same(current, merged):
        return False
    await storage.request(
        "put_bucket_lifecycle_configuration",
        LifecycleConfiguration={"Rules": merged},
    )
    return True


async def _get_rules(
    storage: R2Storage, operation: str, field: str
) -> list[dict[str, Any]]:
    try:
        answer = await storage.request(operation)
    except (StorageError, NotFound) as exc:
        if getattr(exc, "s3_code", None) in _NO_CONFIG_CODES:
            return []
        raise
    return list(answer.get(field, []))


Rules = list[dict[str, Any]]


def _with_rule(rules: Rules, rule: dict[str, Any]) -> Rules:
    others = [r for r in rules if r.get("ID") != rule["ID"]]
    return [*others, rule]


def _same(current: list[dict[str, Any]], wanted: list[dict[str, Any]]) -> bool:
    # Compared ignoring list order inside a rule and keys the backend adds
    # with default values; two rules equal in that sense need no write.
    return bool(_normal(current) == _normal(wanted))


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in sorted(value.items()) if v not in ([], None)}
    if isinstance(value, list):
        return sorted((_normal(v) for v in value), key=repr)
    return value
