-- The order-history projection (CQRS read side): built only from order.*
-- events by the order-history consumer; what GET /v1/orders reads.
CREATE TABLE order_history (
    order_id       BLOB PRIMARY KEY,
    user_id        BLOB NOT NULL,
    status         TEXT NOT NULL,
    items          TEXT NOT NULL,
    total_cents    INTEGER NOT NULL,
    currency       TEXT NOT NULL,
    failure_reason TEXT,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    -- [{"status", "at"}], oldest first.
    timeline       TEXT NOT NULL
);
CREATE INDEX order_history_user ON order_history (user_id, order_id);
