CREATE TABLE orders (
    id             BLOB PRIMARY KEY,
    user_id        BLOB NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending', 'completed', 'failed', 'cancelled')),
    -- Where the saga is: placed -> reserved -> charging -> done.
    step           TEXT NOT NULL CHECK (step IN ('placed', 'reserved', 'charging', 'done')),
    items          TEXT NOT NULL,
    total_cents    INTEGER NOT NULL,
    currency       TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    failure_reason TEXT CHECK (failure_reason IN ('out_of_stock', 'payment_declined', 'payment_error')),
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE INDEX orders_user ON orders (user_id, id);
-- Idempotency-Key: the first response of each (user, key), replayed for 24 hours.
CREATE TABLE idempotency_keys (
    user_id      BLOB NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    status_code  INTEGER,
    location     TEXT,
    response     TEXT,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
