-- In each shard database: the slots it holds. `serving`: its rows of the slot
-- are the truth and take writes. `fenced`: a move is taking the slot away; its
-- rows are still the truth for reads, and writes wait for the new shard.
CREATE TABLE owned_slots (
    slot INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('serving', 'fenced'))
);
-- In the main database: the move in progress (at most one), so that a mover
-- that died is resumed where it stopped. `copied_since` (µs): a copy pass
-- takes the rows changed at or after it.
CREATE TABLE shard_moves (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    slots TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('copying', 'fenced', 'flipped')),
    copied_since BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT
);
