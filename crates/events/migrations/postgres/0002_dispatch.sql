-- Delivery state of each consumer: its position in the log, the retry state of
-- the event at its head, and the lease that lets one process serve it at a time.
CREATE TABLE event_consumers (
    name        TEXT PRIMARY KEY,
    position    BIGINT  NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    retry_at    TIMESTAMPTZ,
    last_error  TEXT,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ
);
-- Events each consumer has handled, written in the consumer's own transaction.
CREATE TABLE event_inbox (
    consumer     TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
-- Events parked after the last attempt, per consumer; `redeliver` asks for one more.
CREATE TABLE event_dead (
    consumer   TEXT        NOT NULL,
    event_id   UUID        NOT NULL,
    sequence   BIGINT      NOT NULL,
    attempts   INTEGER     NOT NULL,
    last_error TEXT        NOT NULL,
    state      TEXT        NOT NULL CHECK (state IN ('dead', 'redeliver', 'redelivered')),
    died_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
