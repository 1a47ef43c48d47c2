CREATE TABLE images (
    id          UUID PRIMARY KEY,
    product_id  UUID        NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('processing', 'ready', 'failed')),
    -- Why it failed; shown to clients.
    error       TEXT,
    -- Set when the image is fetched from a URL instead of uploaded.
    source_url  TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX images_product ON images (product_id, id);

CREATE TABLE image_variants (
    image_id     UUID    NOT NULL REFERENCES images (id),
    name         TEXT    NOT NULL,
    width        INTEGER NOT NULL CHECK (width > 0),
    height       INTEGER NOT NULL CHECK (height > 0),
    content_type TEXT    NOT NULL,
    -- Hex SHA-256 of the bytes: the strong ETag.
    etag         TEXT    NOT NULL,
    size_bytes   BIGINT  NOT NULL,
    -- The object-store key of the bytes.
    object_key   TEXT    NOT NULL,
    PRIMARY KEY (image_id, name)
);
