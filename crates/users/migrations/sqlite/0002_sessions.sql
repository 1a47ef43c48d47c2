-- Sessions that end: a password change moves the user's session epoch on (a
-- token carries the epoch it was issued in), and a signed-out token's id is kept
-- until the token would have expired anyway.
ALTER TABLE users ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;

CREATE TABLE ended_sessions (
    session_id BLOB PRIMARY KEY,
    user_id    BLOB    NOT NULL,
    -- The token's expiry, in seconds since the epoch.
    expires_at INTEGER NOT NULL
);
CREATE INDEX ended_sessions_user ON ended_sessions (user_id, expires_at);
CREATE INDEX ended_sessions_expiry ON ended_sessions (expires_at);

-- Display names may no longer hold bidi controls or invisible characters: drop
-- them from the names stored before the rule (from the search keys too).
UPDATE users
SET name = COALESCE(NULLIF(trim(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(name, char(1564), ''), char(8203), ''), char(8206), ''), char(8207), ''), char(8234), ''), char(8235), ''), char(8236), ''), char(8237), ''), char(8238), ''), char(8288), ''), char(8294), ''), char(8295), ''), char(8296), ''), char(8297), ''), char(65279), '')), ''), 'Unnamed'),
    search_key = replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(search_key, char(1564), ''), char(8203), ''), char(8206), ''), char(8207), ''), char(8234), ''), char(8235), ''), char(8236), ''), char(8237), ''), char(8238), ''), char(8288), ''), char(8294), ''), char(8295), ''), char(8296), ''), char(8297), ''), char(65279), '')
WHERE name <> replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(replace(name, char(1564), ''), char(8203), ''), char(8206), ''), char(8207), ''), char(8234), ''), char(8235), ''), char(8236), ''), char(8237), ''), char(8238), ''), char(8288), ''), char(8294), ''), char(8295), ''), char(8296), ''), char(8297), ''), char(65279), '');
