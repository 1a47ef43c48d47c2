-- Runs that ended with their worker's death (taken back from an expired lease or by
-- a fresh start): they count as attempts, but not toward a failure's backoff.
ALTER TABLE jobs ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
