-- The product listing projection (CQRS read side): one row per product with its
-- stock and images, built only from product.*, inventory.* and image.* events by
-- the product-listing consumer; what GET /v1/products pages through and what a
-- page of search results is read from.
CREATE TABLE product_listing (
    id            BLOB PRIMARY KEY,
    sku           TEXT NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    price_cents   INTEGER NOT NULL,
    currency      TEXT NOT NULL,
    initial_stock INTEGER NOT NULL,
    available     INTEGER NOT NULL,
    -- [{"id", "product_id", "status", "variants", "error"}] in id order, as
    -- GET /v1/images/{id} shows them.
    images        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
