-- Generations keep their full record as a JSON document; the columns beside
-- it exist so that lists, filters, counts and spend can be indexed queries.
CREATE TABLE generations (
    id          text PRIMARY KEY,
    user_id     text NOT NULL,
    status      text NOT NULL,
    seq         bigint NOT NULL CHECK (seq >= 1),
    cost_usd    numeric(12, 4),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    doc         jsonb NOT NULL
);
CREATE INDEX generations_user_id_idx ON generations (user_id, id DESC);
CREATE INDEX generations_status_idx ON generations (status);

-- The event log: one row per change, seq gapless per generation.
CREATE TABLE generation_events (
    generation_id text NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    seq           bigint NOT NULL CHECK (seq >= 1),
    type          text NOT NULL,
    data          jsonb NOT NULL,
    at            timestamptz NOT NULL,
    PRIMARY KEY (generation_id, seq)
);

CREATE TABLE idempotency_keys (
    user_id       text NOT NULL,
    key           text NOT NULL,
    request_hash  text NOT NULL,
    generation_id text NOT NULL REFERENCES generations (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (user_id, key)
);

CREATE TABLE jobs (
    id            text PRIMARY KEY,
    generation_id text NOT NULL UNIQUE REFERENCES generations (id) ON DELETE CASCADE,
    user_id       text NOT NULL,
    priority      integer NOT NULL DEFAULT 0,
    state         text NOT NULL,
    available_at  timestamptz NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    doc           jsonb NOT NULL
);
CREATE INDEX jobs_queued_idx ON jobs (priority DESC, available_at)
    WHERE state = 'queued';
