-- The shard map, kept in the main database: slot ranges to shard, and the epoch
-- every change of the map raises.
CREATE TABLE shard_map (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);
CREATE TABLE shard_ranges (
    first_slot INTEGER PRIMARY KEY,
    last_slot INTEGER NOT NULL,
    shard TEXT NOT NULL
);
-- The shard databases the map knows, in the order of the configured list.
CREATE TABLE shard_databases (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL UNIQUE,
    added_at BIGINT NOT NULL
);
-- In each shard database: which shard it is (a reordered list is refused).
CREATE TABLE shard_identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL
);
