CREATE TABLE jobs (
    id           BLOB    PRIMARY KEY,
    queue        TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('scheduled', 'running', 'completed', 'failed', 'dead')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    last_error   TEXT,
    run_at       TEXT    NOT NULL,
    lease_owner  TEXT,
    lease_until  TEXT,
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL
);
CREATE INDEX jobs_due ON jobs (queue, state, run_at);
