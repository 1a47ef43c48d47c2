-- Stock of each product. The CHECKs are the last line of defence: every change is
-- a conditional UPDATE that cannot take a column below zero.
CREATE TABLE stock (
    product_id UUID PRIMARY KEY,
    available  BIGINT NOT NULL CHECK (available >= 0),
    reserved   BIGINT NOT NULL CHECK (reserved >= 0),
    sold       BIGINT NOT NULL CHECK (sold >= 0),
    updated_at TIMESTAMPTZ NOT NULL
);
-- One reservation per order, so reserve/release/sell are idempotent per order.
CREATE TABLE reservations (
    order_id   UUID PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('reserved', 'rejected', 'released', 'sold')),
    items      JSONB NOT NULL,
    -- For a rejected reservation: the product that was short.
    short_product_id UUID,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE stock_adjustments (
    id         UUID PRIMARY KEY,
    product_id UUID NOT NULL,
    delta      BIGINT NOT NULL,
    reason     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
