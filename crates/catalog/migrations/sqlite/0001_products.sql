CREATE TABLE products (
    id            BLOB PRIMARY KEY,
    sku           TEXT NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    price_cents   INTEGER NOT NULL CHECK (price_cents >= 0),
    currency      TEXT NOT NULL,
    -- What the product was created with; its stock lives in the inventory service.
    -- Lower-cased (Unicode) name, sku and description, joined by U+001F.
    search_key    TEXT NOT NULL,
    initial_stock INTEGER NOT NULL CHECK (initial_stock >= 0),
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    CONSTRAINT products_sku_key UNIQUE (sku)
);
