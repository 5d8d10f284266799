-- The queue: leases, phases and timings on jobs; instances; queue controls.
ALTER TABLE jobs ADD COLUMN queued_at TEXT;
ALTER TABLE jobs ADD COLUMN dispatched_at TEXT;
ALTER TABLE jobs ADD COLUMN finished_at TEXT;
ALTER TABLE jobs ADD COLUMN outcome TEXT;
ALTER TABLE jobs ADD COLUMN phase TEXT;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at TEXT;
ALTER TABLE jobs ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET queued_at = created_at;
CREATE INDEX jobs_running_idx ON jobs (lease_owner) WHERE state = 'running';
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE state = 'finished';

CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    concurrency  INTEGER NOT NULL,
    draining     INTEGER NOT NULL DEFAULT 0,
    running      INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE queue_controls (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
