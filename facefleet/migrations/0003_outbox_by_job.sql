-- FaceFleet job store, version 3: no index on unpublished events.
--
-- The partial index on unpublished events cost an index insert for each event written, and
-- made each publish mark (published = true) a new entry in it as well as in the primary key.
-- The outbox is only ever read per job (a job's events by job_id through the primary key: a
-- few rows), so the index bought nothing. Builds of version 2 run unchanged without it:
-- facefleet-compatible-from: 2
DROP INDEX IF EXISTS job_events_unpublished_idx;
