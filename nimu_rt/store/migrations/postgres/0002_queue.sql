-- The queue: leases, phases and timings on jobs; instances; queue controls.
ALTER TABLE jobs
    ADD COLUMN queued_at        timestamptz,
    ADD COLUMN dispatched_at    timestamptz,
    ADD COLUMN finished_at      timestamptz,
    ADD COLUMN outcome          text,
    ADD COLUMN phase            text,
    ADD COLUMN lease_owner      text,
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN lease_token      bigint NOT NULL DEFAULT 0;
UPDATE jobs SET queued_at = created_at;
CREATE INDEX jobs_running_idx ON jobs (lease_owner) WHERE state = 'running';
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE state = 'finished';

-- One row per running nimu-rt process; a stale heartbeat means it is gone.
CREATE TABLE instances (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    concurrency  integer NOT NULL,
    draining     boolean NOT NULL DEFAULT false,
    running      integer NOT NULL DEFAULT 0
);

-- Cluster-wide queue controls (e.g. paused), so they survive restarts.
CREATE TABLE queue_controls (
    name  text PRIMARY KEY,
    value text NOT NULL
);
