-- The event log and outbox: one row per committed event, in commit order
-- (appends serialize on an advisory lock held to commit, so sequence order is
-- commit order and a reader never skips a late-committing row).
CREATE TABLE events (
    sequence     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           UUID        NOT NULL UNIQUE,
    type         TEXT        NOT NULL,
    version      INTEGER     NOT NULL,
    aggregate_id UUID        NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    data         JSONB       NOT NULL
);
CREATE INDEX events_aggregate ON events (aggregate_id, sequence);
