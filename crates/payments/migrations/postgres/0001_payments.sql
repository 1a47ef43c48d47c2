-- The sandbox gateway's ledger: every charge attempt that reached it.
CREATE TABLE payment_ledger (
    id              UUID PRIMARY KEY,
    order_id        UUID NOT NULL,
    amount_cents    BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    method          TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('succeeded', 'declined', 'error')),
    idempotency_key TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX payment_ledger_order ON payment_ledger (order_id, created_at);
-- The gateway's de-duplication: one final answer per idempotency key, ever.
CREATE UNIQUE INDEX payment_ledger_final ON payment_ledger (idempotency_key)
    WHERE status IN ('succeeded', 'declined');
-- The payment service's own record: one outcome per order, with its event.
CREATE TABLE payments (
    order_id   UUID PRIMARY KEY,
    status     TEXT NOT NULL CHECK (status IN ('succeeded', 'declined', 'error')),
    created_at TIMESTAMPTZ NOT NULL
);
