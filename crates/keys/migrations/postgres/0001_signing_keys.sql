-- The signing keys of every instance (tokens, cursors, consistency tokens). The
-- highest generation signs; every row verifies until it is pruned.
CREATE TABLE signing_keys (
    kid        TEXT PRIMARY KEY,
    secret     BYTEA NOT NULL,
    generation BIGINT NOT NULL UNIQUE,
    -- verifies values made before key ids existed (an imported signing.key)
    legacy     BOOLEAN NOT NULL,
    -- microseconds since the Unix epoch
    created_at BIGINT NOT NULL,
    -- when a newer key took over; NULL for the key that signs
    retired_at BIGINT
);
