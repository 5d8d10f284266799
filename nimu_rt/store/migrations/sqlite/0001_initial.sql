-- Same shape as the PostgreSQL schema; JSON documents are TEXT and times are
-- ISO 8601 UTC text, which sorts in time order.
CREATE TABLE generations (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    status      TEXT NOT NULL,
    seq         INTEGER NOT NULL CHECK (seq >= 1),
    cost_usd    REAL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    doc         TEXT NOT NULL
);
CREATE INDEX generations_user_id_idx ON generations (user_id, id DESC);
CREATE INDEX generations_status_idx ON generations (status);

CREATE TABLE generation_events (
    generation_id TEXT NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL CHECK (seq >= 1),
    type          TEXT NOT NULL,
    data          TEXT NOT NULL,
    at            TEXT NOT NULL,
    PRIMARY KEY (generation_id, seq)
) WITHOUT ROWID;

CREATE TABLE idempotency_keys (
    user_id       TEXT NOT NULL,
    key           TEXT NOT NULL,
    request_hash  TEXT NOT NULL,
    generation_id TEXT NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (user_id, key)
) WITHOUT ROWID;

CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    generation_id TEXT NOT NULL UNIQUE REFERENCES generations (id) ON DELETE CASCADE,
    user_id       TEXT NOT NULL,
    priority      INTEGER NOT NULL DEFAULT 0,
    state         TEXT NOT NULL,
    available_at  TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    doc           TEXT NOT NULL
);
CREATE INDEX jobs_queued_idx ON jobs (priority DESC, available_at)
    WHERE state = 'queued';
