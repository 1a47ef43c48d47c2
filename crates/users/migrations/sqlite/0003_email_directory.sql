-- With shards (the users live in the shard databases), the main database keeps
-- the directory of addresses: one row per address, naming the user who holds it.
-- Its primary key keeps an address unique across every shard, and a sign-in by
-- address reads one row here, then one shard. A row is claimed before the user's
-- shard is written; `claimed_at` (µs) lets a claim whose write never happened be
-- taken over after a grace period.
CREATE TABLE user_emails (
    email      TEXT PRIMARY KEY,
    user_id    BLOB NOT NULL,
    claimed_at BIGINT NOT NULL
);
CREATE INDEX user_emails_user ON user_emails (user_id);
