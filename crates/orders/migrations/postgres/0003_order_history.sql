-- The order-history projection (CQRS read side): built only from order.*
-- events by the order-history consumer; what GET /v1/orders reads.
CREATE TABLE order_history (
    order_id       UUID PRIMARY KEY,
    user_id        UUID NOT NULL,
    status         TEXT NOT NULL,
    items          JSONB NOT NULL,
    total_cents    BIGINT NOT NULL,
    currency       TEXT NOT NULL,
    failure_reason TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    -- [{"status", "at"}], oldest first.
    timeline       JSONB NOT NULL
);
CREATE INDEX order_history_user ON order_history (user_id, order_id);
