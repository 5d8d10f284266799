-- The daily spend cap sums one user's jobs queued since midnight at every
-- confirm and retry; this keeps that an index range scan.
CREATE INDEX jobs_user_queued_idx ON jobs (user_id, queued_at);
