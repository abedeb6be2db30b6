-- FaceFleet job store, version 1: one row per job (its summary, cancel marker and the top seq)
-- and its gapless event log. `schema_migrations` is created by the migrator itself.

CREATE TABLE jobs (
    job_id              uuid PRIMARY KEY,
    tier                text,
    state               text NOT NULL DEFAULT 'queued',
    created_at          timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    error_code          text,
    last_seq            integer NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    cancel_reason       text,
    cancel_requested_at timestamptz,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- `jobs list`: newest first, then job id (keyset pagination), optionally by state or tier.
CREATE INDEX jobs_created_idx ON jobs (created_at DESC, job_id);
CREATE INDEX jobs_state_created_idx ON jobs (state, created_at DESC, job_id);
CREATE INDEX jobs_tier_created_idx ON jobs (tier, created_at DESC, job_id);

CREATE TABLE job_events (
    job_id    uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    seq       integer NOT NULL CHECK (seq >= 1),
    type      text NOT NULL,
    ts        timestamptz NOT NULL,
    body      jsonb NOT NULL,          -- the JobEvent as published (wire.JobEvent JSON)
    published boolean NOT NULL DEFAULT false,
    PRIMARY KEY (job_id, seq)
);

-- The outbox: events not yet confirmed by the broker (few at any time).
CREATE INDEX job_events_unpublished_idx ON job_events (job_id, seq) WHERE NOT published;
