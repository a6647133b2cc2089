-- What each worker's sandboxes cannot enforce (found at its start), so that /readyz of any API
-- replica can say it. One row per worker process; a worker refreshes seen_at while it runs and
-- removes its row when it stops; rows not seen for a while are ignored and cleaned up.
CREATE TABLE worker_sandboxes (
    worker     text PRIMARY KEY,
    host       text NOT NULL,
    sandbox    text NOT NULL,
    gaps       jsonb NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);
