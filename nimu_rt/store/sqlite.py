"""The embedded store: one SQLite file, for a laptop or a single process.

sqlite3 calls block, so every call runs on one dedicated thread. One
connection serves the whole process and an asyncio lock gives it to one
transaction (or read) at a time: SQLite allows one writer anyway, and a
single connection means a transaction can never see another's half-done work.

Limits: one process per file. Several processes may open the same file
(``nimu-rt migrate`` beside a running server is fine) but the queue's
coordination and cross-instance events need PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

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

T = TypeVar("T")

_UNAVAILABLE = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_FULL",
    "SQLITE_READONLY",
    "SQLITE_PROTOCOL",
)

_generation = msgspec.json.Decoder(Generation)
_encode = msgspec.json.Encoder().encode
_decode_data = msgspec.json.Decoder(dict[str, Any]).decode


def format_time(value: dt.datetime) -> str:
    """Fixed-width UTC text, so that string order is time order."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> dt.datetime:
    """A time written by :func:`format_time`, as an aware UTC datetime."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


# Datetime parameters are stored in the sortable text form above.
sqlite3.register_adapter(dt.datetime, format_time)

_NUMBERED = re.compile(r"\$(\d+)")
_LOCKING = re.compile(r"\s+FOR UPDATE(?: SKIP LOCKED)?", re.I)


@functools.lru_cache(maxsize=256)
def sqlite_sql(sql: str) -> str:
    """A query written for PostgreSQL in SQLite's spelling.

    ``$1`` becomes ``?1`` (SQLite's numbered parameters) and row locks are
    dropped: BEGIN IMMEDIATE already holds the whole database.
    """
    return _LOCKING.sub("", _NUMBERED.sub(r"?\1", sql))


class SqliteStore(Store):
    """The store in one SQLite file (the embedded default)."""

    kind = "sqlite"

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        super().__init__()
        self.path = Path(path)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """``sqlite:///relative/or/absolute/path.db``."""
        path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
        return cls(Path(path))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreUnavailable("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            # Busy, locked, I/O and open failures are the database being
            # unavailable; anything else (a bad statement) is our bug.
            if getattr(exc, "sqlite_errorname", "").startswith(_UNAVAILABLE):
                raise StoreUnavailable(f"SQLite: {exc}") from exc
            raise

    async def open(self) -> None:
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nimu-sqlite")
        self._conn = await self._run(self._connect)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed job survives a power cut, which WAL's NORMAL
        # does not promise.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn = None
        if conn is not None and executor is not None:
            async with self._lock:
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        if executor is not None:
            executor.shutdown(wait=True)
        self._executor = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable("the SQLite store is not open")
        return self._conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            return await self._run(fn, self.conn)

    # -- schema ----------------------------------------------------------------

    def _applied(self, conn: sqlite3.Connection) -> set[int]:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TEXT NOT NULL)"
        )
        return {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}

    async def pending_migrations(self) -> list[int]:
        applied = await self._read(self._applied)
        known = load_migrations("sqlite")
        return [m.version for m in known if m.version not in applied]

    async def migrate(self) -> list[int]:
        def apply(conn: sqlite3.Connection) -> list[int]:
            done = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                applied = self._applied(conn)
                for m in load_migrations("sqlite"):
                    if m.version in applied:
                        continue
                    for statement in _statements(m.sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                        (m.version, m.name, format_time(dt.datetime.now(dt.UTC))),
                    )
                    done.append(m.version)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return done

        return await self._read(apply)

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    # -- transactions ------------------------------------------------------------

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[SqliteTransaction]:
        async with self._lock:
            await self._run(self.conn.execute, "BEGIN IMMEDIATE")
            tx = SqliteTransaction(self)
            try:
                yield tx
            except BaseException:
                # Shielded: a cancelled caller must still release the write
                # lock, or the next transaction would fail with "database is
                # locked".
                await asyncio.shield(self._run(self.conn.execute, "ROLLBACK"))
                raise
            try:
                await asyncio.shield(self._run(self.conn.execute, "COMMIT"))
            except BaseException:
                if self.conn.in_transaction:
                    await asyncio.shield(self._run(self.conn.execute, "ROLLBACK"))
                raise

    # -- reads -------------------------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        query = sqlite_sql(sql)
        return await self._read(lambda c: c.execute(query, args).fetchall())

    async def execute(self, sql: str, *args: Any) -> int:
        async with self.transaction() as tx:
            return await tx.execute(sql, *args)

    async def get_generation(self, generation_id: str) -> Generation | None:
        return await self._read(lambda c: _get_generation(c, generation_id))

    async def list_generations(
        self,
        user_id: str,
        *,
        statuses: Iterable[Status] = (),
        before_id: str | None = None,
        limit: int = 20,
    ) -> list[Generation]:
        sql = "SELECT doc FROM generations WHERE user_id = ?"
        args: list[Any] = [user_id]
        wanted = [str(s) for s in statuses]
        if wanted:
            sql += f" AND status IN ({','.join('?' * len(wanted))})"
            args += wanted
        if before_id is not None:
            sql += " AND id < ?"
            args.append(before_id)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [_generation.decode(r[0]) for r in rows]

    async def events_after(
        self, generation_id: str, since_seq: int, limit: int = 1000
    ) -> list[Event]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT e.generation_id, e.seq, e.type, e.data, e.at, g.user_id"
                " FROM generation_events e JOIN generations g ON g.id = e.generation_id"
                " WHERE e.generation_id = ? AND e.seq > ? ORDER BY e.seq LIMIT ?",
                (generation_id, since_seq, limit),
            ).fetchall()
        )
        return [_event(r) for r in rows]

    async def counts_by_status(self) -> dict[str, int]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT status, count(*) FROM generations GROUP BY status"
            ).fetchall()
        )
        return {status: n for status, n in rows}


class SqliteTransaction(Transaction):
    """A transaction holding SQLite's single write lock."""

    def __init__(self, store: SqliteStore) -> None:
        super().__init__()
        self._store = store

    async def _exec(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        return await self._store._run(self._store.conn.execute, sql, tuple(args))

    async def lock_generation(self, generation_id: str) -> Generation | None:
        # BEGIN IMMEDIATE already holds the database's write lock.
        return await self._store._run(_get_generation, self._store.conn, generation_id)

    async def insert_generation(self, generation: Generation) -> None:
        await self._exec(
            "INSERT INTO generations"
            " (id, user_id, status, seq, cost_usd, created_at, updated_at, doc)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            _generation_row(generation),
        )

    async def _write_generation(self, generation: Generation, prior_seq: int) -> bool:
        row = _generation_row(generation)
        cursor = await self._exec(
            "UPDATE generations SET user_id = ?, status = ?, seq = ?, cost_usd = ?,"
            " created_at = ?, updated_at = ?, doc = ? WHERE id = ? AND seq = ?",
            (*row[1:], generation.id, prior_seq),
        )
        return cursor.rowcount == 1

    async def _insert_event(self, event: Event) -> None:
        await self._exec(
            "INSERT INTO generation_events (generation_id, seq, type, data, at)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                event.generation_id,
                event.seq,
                event.type,
                _encode(event.data).decode(),
                format_time(event.at),
            ),
        )

    async def insert_idempotency(self, record: IdempotencyRecord) -> bool:
        cursor = await self._exec(
            "INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id, key) DO NOTHING",
            (
                record.user_id,
                record.key,
                record.request_hash,
                record.generation_id,
                format_time(record.created_at),
            ),
        )
        return cursor.rowcount == 1

    async def get_idempotency(self, user_id: str, key: str) -> IdempotencyRecord | None:
        cursor = await self._exec(
            "SELECT user_id, key, request_hash, generation_id, created_at"
            " FROM idempotency_keys WHERE user_id = ? AND key = ?",
            (user_id, key),
        )
        row = await self._store._run(cursor.fetchone)
        if row is None:
            return None
        return IdempotencyRecord(
            user_id=row[0],
            key=row[1],
            request_hash=row[2],
            generation_id=row[3],
            created_at=parse_time(row[4]),
        )

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        cursor = await self._exec(sqlite_sql(sql), args)
        return await self._store._run(cursor.fetchall)

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._exec(sqlite_sql(sql), args)
        return cursor.rowcount


def _get_generation(conn: sqlite3.Connection, generation_id: str) -> Generation | None:
    row = conn.execute(
        "SELECT doc FROM generations WHERE id = ?", (generation_id,)
    ).fetchone()
    return None if row is None else _generation.decode(row[0])


def _generation_row(g: Generation) -> tuple[Any, ...]:
    cost = g.cost_estimate.usd if g.cost_estimate else None
    return (
        g.id,
        g.user_id,
        str(g.status),
        g.seq,
        cost,
        format_time(g.created_at),
        format_time(g.updated_at),
        _encode(g).decode(),
    )


def _event(row: tuple[Any, ...]) -> Event:
    generation_id, seq, type_, data, at, user_id = row
    return Event(
        generation_id=generation_id,
        user_id=user_id,
        seq=seq,
        type=type_,
        data=_decode_data(data),
        at=parse_time(at),
    )


def _statements(sql: str) -> list[str]:
    """Split a migration file into statements (no semicolons in literals)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
