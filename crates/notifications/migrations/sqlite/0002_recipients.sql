-- Where to reach each user: this service's own copy, kept from user.created and
-- user.updated (it never reads the users service's tables).
CREATE TABLE recipients (
    user_id    BLOB PRIMARY KEY,
    email      TEXT NOT NULL,
    name       TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
