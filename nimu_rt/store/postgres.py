"""The production store: PostgreSQL through an asyncpg pool.

PostgreSQL is also the cluster's coordination engine (leases, the
coordinator's advisory lock, LISTEN/NOTIFY); those parts live with the code
that uses them and borrow connections from :attr:`PostgresStore.pool`.

asyncpg and connection errors are translated here into
:class:`~nimu_rt.errors.StoreUnavailable`; constraint violations that mean a
bug stay as they are.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec

from nimu_rt.errors import StoreUnavailable
from nimu_rt.lifecycle import Status
from nimu_rt.models import Event, Generation
from nimu_rt.store.base import (
    IdempotencyRecord,
    Store,
    Transaction,
    load_migrations,
)

log = logging.getLogger(__name__)

_generation = msgspec.json.Decoder(Generation)
_encode = msgspec.json.Encoder().encode
_decode_data = msgspec.json.Decoder(dict[str, Any]).decode

# Errors that mean "not now: try again", as opposed to "this statement is
# wrong".
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    # Deadlock victims and serialization failures: the transaction may
    # simply be tried again.
    asyncpg.TransactionRollbackError,
)
_MIGRATION_LOCK = 0x6E696D75  # "nimu": serialises concurrent `nimu-rt migrate`
# "spen": the first key of per-user locks (two-key advisory locks never meet
# the one-key locks of migrations and coordination).
_USER_LOCK_SPACE = 0x7370656E

Notifier = Callable[[Event], tuple[str, str]]


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Turn connection-level failures into StoreUnavailable."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"PostgreSQL: {exc}") from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's session reset when a pooled connection is released.

    The reset is a query (unlock advisory locks, close cursors, UNLISTEN,
    RESET ALL) and so one more round trip for every store call. The pool's
    connections carry none of that state: session advisory locks and LISTEN
    use dedicated connections, and nothing runs SET. asyncpg still rolls
    back a transaction left open before it calls this.
    """


class PostgresStore(Store):
    """The store on PostgreSQL, through one asyncpg pool."""

    kind = "postgres"

    def __init__(
        self,
        url: str,
        *,
        schema: str = "public",
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout_s: float = 10.0,
        command_timeout_s: float = 30.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        # Set by the event bridge: the (channel, payload) to NOTIFY for each
        # event, sent in the transaction that writes it.
        self.notifier: Notifier | None = None

    @property
    def connect_timeout_s(self) -> float:
        return self._connect_timeout_s

    @property
    def command_timeout_s(self) -> float:
        return self._command_timeout_s

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        return self._pool

    def connect_kwargs(self) -> dict[str, Any]:
        """Arguments for a dedicated connection (e.g. one that LISTENs)."""
        return {
            "dsn": self.url,
            "timeout": self._connect_timeout_s,
            "command_timeout": self._command_timeout_s,
            "server_settings": {
                "search_path": self.schema,
                "application_name": "nimu-rt",
            },
        }

    async def open(self) -> None:
        if self._pool is not None:
            return
        kwargs = self.connect_kwargs()
        async with translate_errors():
            if self.schema != "public":
                # The schema must exist before a search_path can point at it.
                conn = await asyncpg.connect(
                    kwargs["dsn"], timeout=kwargs["timeout"]
                )
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                finally:
                    await conn.close()
            self._pool = await asyncpg.create_pool(
                min_size=self._min_size,
                max_size=self._max_size,
                reset=_keep_session,
                **kwargs,
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- schema ----------------------------------------------------------------

    _CREATE_MIGRATIONS = (
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version integer PRIMARY KEY, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )

    async def pending_migrations(self) -> list[int]:
        async with translate_errors(), self.pool.acquire() as conn:
            exists = await conn.fetchval("SELECT to_regclass('schema_migrations')")
            applied = set()
            if exists:
                rows = await conn.fetch("SELECT version FROM schema_migrations")
                applied = {r[0] for r in rows}
        known = load_migrations("postgres")
        return [m.version for m in known if m.version not in applied]

    async def migrate(self) -> list[int]:
        done = []
        async with translate_errors(), self.pool.acquire() as conn:
            async with conn.transaction():
                # Two instances starting together must not both apply 0001.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(self._CREATE_MIGRATIONS)
                rows = await conn.fetch("SELECT version FROM schema_migrations")
                applied = {r[0] for r in rows}
                for m in load_migrations("postgres"):
                    if m.version in applied:
                        continue
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        m.version,
                        m.name,
                    )
                    done.append(m.version)
        return done

    async def ping(self) -> None:
        async with translate_errors():
            await self.pool.fetchval("SELECT 1", timeout=self._connect_timeout_s)

    # -- transactions ------------------------------------------------------------

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[PostgresTransaction]:
        async with translate_errors(), self.pool.acquire() as conn:
            async with conn.transaction():
                yield PostgresTransaction(conn, self.notifier)

    # -- reads -------------------------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        async with translate_errors():
            return [tuple(r) for r in await self.pool.fetch(sql, *args)]

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, *args)

    async def get_generation(self, generation_id: str) -> Generation | None:
        async with translate_errors():
            doc = await self.pool.fetchval(
                "SELECT doc FROM generations WHERE id = $1", generation_id
            )
        return None if doc is None else _generation.decode(doc)

    async def list_generations(
        self,
        user_id: str,
        *,
        statuses: Iterable[Status] = (),
        before_id: str | None = None,
        limit: int = 20,
    ) -> list[Generation]:
        wanted = [str(s) for s in statuses]
        async with translate_errors():
            rows = await self.pool.fetch(
                "SELECT doc FROM generations WHERE user_id = $1"
                " AND (cardinality($2::text[]) = 0 OR status = ANY($2::text[]))"
                " AND ($3::text IS NULL OR id < $3)"
                " ORDER BY id DESC LIMIT $4",
                user_id,
                wanted,
                before_id,
                limit,
            )
        return [_generation.decode(r[0]) for r in rows]

    async def events_after(
        self, generation_id: str, since_seq: int, limit: int = 1000
    ) -> list[Event]:
        async with translate_errors():
            rows = await self.pool.fetch(
                "SELECT e.generation_id, e.seq, e.type, e.data, e.at, g.user_id"
                " FROM generation_events e JOIN generations g ON g.id = e.generation_id"
                " WHERE e.generation_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3",
                generation_id,
                since_seq,
                limit,
            )
        return [_event(r) for r in rows]

    async def counts_by_status(self) -> dict[str, int]:
        async with translate_errors():
            rows = await self.pool.fetch(
                "SELECT status, count(*) FROM generations GROUP BY status"
            )
        return {r[0]: r[1] for r in rows}


class PostgresTransaction(Transaction):
    """A transaction on one pooled connection."""

    def __init__(
        self, conn: asyncpg.Connection, notifier: Notifier | None = None
    ) -> None:
        super().__init__()
        self.conn = conn
        self._notifier = notifier

    async def lock_generation(self, generation_id: str) -> Generation | None:
        doc = await self.conn.fetchval(
            "SELECT doc FROM generations WHERE id = $1 FOR UPDATE", generation_id
        )
        return None if doc is None else _generation.decode(doc)

    async def lock_user(self, user_id: str) -> None:
        # Keyed by schema too: deployments sharing a server stay apart.
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock("
            "$1, hashtext(current_schema() || '/' || $2))",
            _USER_LOCK_SPACE,
            user_id,
        )

    async def insert_generation(self, generation: Generation) -> None:
        await self.conn.execute(
            "INSERT INTO generations"
            " (id, user_id, status, seq, cost_usd, created_at, updated_at, doc)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)",
            *_generation_row(generation),
        )

    async def _write_generation(self, generation: Generation, prior_seq: int) -> bool:
        result = await self.conn.execute(
            "UPDATE generations SET user_id = $2, status = $3, seq = $4,"
            " cost_usd = $5, created_at = $6, updated_at = $7, doc = $8::jsonb"
            " WHERE id = $1 AND seq = $9",
            *_generation_row(generation),
            prior_seq,
        )
        return result == "UPDATE 1"

    async def _insert_event(self, event: Event) -> None:
        insert = (
            "INSERT INTO generation_events (generation_id, seq, type, data, at)"
            " VALUES ($1, $2, $3, $4::jsonb, $5)"
        )
        args = [
            event.generation_id,
            event.seq,
            event.type,
            _encode(event.data).decode(),
            event.at,
        ]
        if self._notifier is None:
            await self.conn.execute(insert, *args)
            return
        # NOTIFY in the same statement and transaction: PostgreSQL delivers
        # it only if the transaction commits, in commit order.
        channel, payload = self._notifier(event)
        await self.conn.execute(
            f"WITH e AS ({insert}) SELECT pg_notify($6, $7)", *args, channel, payload
        )

    async def insert_idempotency(self, record: IdempotencyRecord) -> bool:
        result = await self.conn.execute(
            "INSERT INTO idempotency_keys VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (user_id, key) DO NOTHING",
            record.user_id,
            record.key,
            record.request_hash,
            record.generation_id,
            record.created_at,
        )
        return result == "INSERT 0 1"

    async def get_idempotency(self, user_id: str, key: str) -> IdempotencyRecord | None:
        row = await self.conn.fetchrow(
            "SELECT user_id, key, request_hash, generation_id, created_at"
            " FROM idempotency_keys WHERE user_id = $1 AND key = $2",
            user_id,
            key,
        )
        if row is None:
            return None
        return IdempotencyRecord(
            user_id=row[0],
            key=row[1],
            request_hash=row[2],
            generation_id=row[3],
            created_at=row[4],
        )

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.conn.fetch(sql, *args)]

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self.conn.execute(sql, *args)
        # "UPDATE 3", "INSERT 0 1", "DELETE 2": the count is the last word.
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0


def _generation_row(g: Generation) -> tuple[Any, ...]:
    return (
        g.id,
        g.user_id,
        str(g.status),
        g.seq,
        g.cost_estimate.usd if g.cost_estimate else None,
        g.created_at,
        g.updated_at,
        _encode(g).decode(),
    )


def _event(row: asyncpg.Record) -> Event:
    return Event(
        generation_id=row[0],
        user_id=row[5],
        seq=row[1],
        type=row[2],
        data=_decode_data(row[3]),
        at=row[4].astimezone(dt.UTC),
    )
