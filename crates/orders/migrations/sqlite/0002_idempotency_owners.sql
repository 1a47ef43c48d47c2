-- The process that claimed an in-flight key, and until when each process was last
-- known alive (a heartbeat): a key whose process died is taken over at once.
ALTER TABLE idempotency_keys ADD COLUMN owner TEXT;
CREATE TABLE idempotency_owners (
    owner       TEXT PRIMARY KEY,
    alive_until TEXT NOT NULL
);
