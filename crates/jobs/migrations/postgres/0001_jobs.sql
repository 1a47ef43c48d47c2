CREATE TABLE jobs (
    id           UUID        PRIMARY KEY,
    queue        TEXT        NOT NULL,
    payload      JSONB       NOT NULL,
    state        TEXT        NOT NULL CHECK (state IN ('scheduled', 'running', 'completed', 'failed', 'dead')),
    attempts     INTEGER     NOT NULL DEFAULT 0,
    max_attempts INTEGER     NOT NULL,
    last_error   TEXT,
    run_at       TIMESTAMPTZ NOT NULL,
    lease_owner  TEXT,
    lease_until  TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX jobs_due ON jobs (queue, state, run_at);
