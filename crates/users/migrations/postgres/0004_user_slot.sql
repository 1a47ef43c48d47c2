-- The user's hash slot (crc32 of the id mod 1024): what a shard's move copies
-- and deletes by. Written with every user; NULL only for rows of earlier
-- versions, which were never in a shard.
ALTER TABLE users ADD COLUMN slot INTEGER;
CREATE INDEX users_slot ON users (slot, updated_at);
