-- When a session was ended (µs): a shard's move copies the ended sessions of
-- its slots that changed since its last pass, not all of them each time.
-- Rows from before: 0 (copied by a move's first pass).
ALTER TABLE ended_sessions ADD COLUMN ended_at BIGINT NOT NULL DEFAULT 0;
