-- When a job's paid submit call began: the submissions-per-minute window
-- counts these, so that a new coordinator knows what its predecessor sent.
ALTER TABLE jobs ADD COLUMN submit_started_at TEXT;
CREATE INDEX jobs_submit_started_idx ON jobs (submit_started_at)
    WHERE submit_started_at IS NOT NULL;
