-- In the main database: the last resharding request (a move of slots to a
-- shard, or a rebalance) and how it ended. Any process of the users service
-- runs it; one whose runner died (its lease ran out) is run again, from the
-- map as it is then.
CREATE TABLE shard_requests (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    request TEXT NOT NULL,
    slots TEXT,
    target TEXT,
    state TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    result TEXT,
    asked_at BIGINT NOT NULL,
    ended_at BIGINT,
    lease_owner TEXT,
    lease_until BIGINT
);
