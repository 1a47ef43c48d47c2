CREATE TABLE notifications (
    id         UUID PRIMARY KEY,
    user_id    UUID        NOT NULL,
    kind       TEXT        NOT NULL CHECK (kind IN ('welcome', 'order_confirmation', 'order_failed')),
    channel    TEXT        NOT NULL CHECK (channel IN ('email')),
    to_addr    TEXT        NOT NULL,
    subject    TEXT        NOT NULL,
    body       TEXT        NOT NULL,
    status     TEXT        NOT NULL CHECK (status IN ('queued', 'sent', 'failed')),
    order_id   UUID,
    -- One notification per cause ("welcome:<user>", "order:<order>"), whatever is redelivered.
    dedup_key  TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    sent_at    TIMESTAMPTZ,
    CONSTRAINT notifications_dedup_key UNIQUE (dedup_key)
);
CREATE INDEX notifications_user ON notifications (user_id, id);
