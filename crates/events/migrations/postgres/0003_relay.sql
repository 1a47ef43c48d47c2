-- The relay that publishes the outbox to NATS JetStream (SCALESHOP_NATS_URL):
-- the last event it published (all acknowledged by the broker), and the lease
-- that lets one process relay at a time.
CREATE TABLE event_relays (
    name        TEXT PRIMARY KEY,
    position    BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until TIMESTAMPTZ
);
