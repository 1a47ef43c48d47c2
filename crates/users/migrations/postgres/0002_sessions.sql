-- Sessions that end: a password change moves the user's session epoch on (a
-- token carries the epoch it was issued in), and a signed-out token's id is kept
-- until the token would have expired anyway.
ALTER TABLE users ADD COLUMN session_epoch BIGINT NOT NULL DEFAULT 0;

CREATE TABLE ended_sessions (
    session_id UUID PRIMARY KEY,
    user_id    UUID   NOT NULL,
    -- The token's expiry, in seconds since the epoch.
    expires_at BIGINT NOT NULL
);
CREATE INDEX ended_sessions_user ON ended_sessions (user_id, expires_at);
CREATE INDEX ended_sessions_expiry ON ended_sessions (expires_at);

-- Display names may no longer hold bidi controls or invisible characters: drop
-- them from the names stored before the rule (from the search keys too).
UPDATE users
SET name = COALESCE(NULLIF(btrim(translate(name, U&'\061C\200B\200E\200F\202A\202B\202C\202D\202E\2060\2066\2067\2068\2069\FEFF', '')), ''), 'Unnamed'),
    search_key = translate(search_key, U&'\061C\200B\200E\200F\202A\202B\202C\202D\202E\2060\2066\2067\2068\2069\FEFF', '')
WHERE name <> translate(name, U&'\061C\200B\200E\200F\202A\202B\202C\202D\202E\2060\2066\2067\2068\2069\FEFF', '');
