-- The event log and outbox: one row per committed event, in commit order.
CREATE TABLE events (
    sequence     INTEGER PRIMARY KEY AUTOINCREMENT,
    id           BLOB    NOT NULL UNIQUE,
    type         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    aggregate_id BLOB    NOT NULL,
    occurred_at  TEXT    NOT NULL,
    data         TEXT    NOT NULL
);
CREATE INDEX events_aggregate ON events (aggregate_id, sequence);
