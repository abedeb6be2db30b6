-- FaceFleet job store, version 2: who submitted each job (the API key id from its `queued`
-- event's payload) and the GPU-seconds it used (its `completed` event's timings_s.total), for
-- `GET /v1/jobs` scoped to a key, `GET /v1/usage` and the per-key limits.

ALTER TABLE jobs ADD COLUMN api_key_id text;
ALTER TABLE jobs ADD COLUMN gpu_seconds double precision;

-- A key's jobs, newest first (listing, usage since a time, submissions in the last minute).
CREATE INDEX jobs_key_created_idx ON jobs (api_key_id, created_at DESC, job_id);
-- A key's queued + running jobs (the active limit).
CREATE INDEX jobs_key_active_idx ON jobs (api_key_id) WHERE state IN ('queued', 'running');

-- Jobs recorded before this version.
UPDATE jobs AS j SET api_key_id = e.body -> 'payload' ->> 'api_key_id'
FROM job_events AS e
WHERE e.job_id = j.job_id AND e.seq = 1 AND e.type = 'queued'
  AND e.body -> 'payload' ->> 'api_key_id' IS NOT NULL;

UPDATE jobs AS j SET gpu_seconds = (e.body -> 'payload' -> 'timings_s' ->> 'total')::double precision
FROM job_events AS e
WHERE e.job_id = j.job_id AND e.type = 'completed'
  AND jsonb_typeof(e.body -> 'payload' -> 'timings_s' -> 'total') = 'number';
