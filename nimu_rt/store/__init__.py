"""The store: one interface (:mod:`.base`), PostgreSQL and SQLite behind it."""

from __future__ import annotations

from nimu_rt.config import Settings
from nimu_rt.errors import ConfigError
from nimu_rt.store.base import IdempotencyRecord, Job, Store, Transaction

__all__ = ["IdempotencyRecord", "Job", "Store", "Transaction", "create_store"]


def create_store(settings: Settings) -> Store:
    """The store named by ``database.url`` (not yet opened)."""
    url = settings.database_url
    if url.startswith("sqlite:"):
        from nimu_rt.store.sqlite import SqliteStore

        return SqliteStore.from_url(url)
    if url.startswith(("postgresql://", "postgres://")):
        from nimu_rt.store.postgres import PostgresStore

        db = settings.database
        return PostgresStore(
            url,
            schema=db.schema_name,
            min_size=db.pool_min_size,
            max_size=db.pool_max_size,
            connect_timeout_s=db.connect_timeout_s,
            command_timeout_s=db.command_timeout_s,
        )
    raise ConfigError(
        "database.url: must start with postgresql:// or sqlite:///"
        f" (got {url.split(':', 1)[0]}:...)"
    )
