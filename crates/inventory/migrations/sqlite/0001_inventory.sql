-- Stock of each product. The CHECKs are the last line of defence: every change is
-- a conditional UPDATE that cannot take a column below zero.
CREATE TABLE stock (
    product_id BLOB PRIMARY KEY,
    available  INTEGER NOT NULL CHECK (available >= 0),
    reserved   INTEGER NOT NULL CHECK (reserved >= 0),
    sold       INTEGER NOT NULL CHECK (sold >= 0),
    updated_at TEXT NOT NULL
);
-- One reservation per order, so reserve/release/sell are idempotent per order.
CREATE TABLE reservations (
    order_id   BLOB PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('reserved', 'rejected', 'released', 'sold')),
    items      TEXT NOT NULL,
    -- For a rejected reservation: the product that was short.
    short_product_id BLOB,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE stock_adjustments (
    id         BLOB PRIMARY KEY,
    product_id BLOB NOT NULL,
    delta      INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
