-- The product listing projection (CQRS read side): one row per product with its
-- stock and images, built only from product.*, inventory.* and image.* events by
-- the product-listing consumer; what GET /v1/products pages through and what a
-- page of search results is read from.
CREATE TABLE product_listing (
    id            UUID PRIMARY KEY,
    sku           TEXT NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    price_cents   BIGINT NOT NULL,
    currency      TEXT NOT NULL,
    initial_stock BIGINT NOT NULL,
    available     BIGINT NOT NULL,
    -- [{"id", "product_id", "status", "variants", "error"}] in id order, as
    -- GET /v1/images/{id} shows them.
    images        JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL
);
