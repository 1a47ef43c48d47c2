//! Storage port of the users service and its two adapters (SQLite, PostgreSQL).
//! Both run the same SQL; the macro below keeps them one text.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_db::shards::Shards;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{
    Consistency, Database, Migrations, StoreError, read_with_as_of, with_pool, with_tx,
};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::domain::{Email, PasswordHash, Role, SessionState, User, UserName, UserRecord};

/// The tables this service owns.
pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "users",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// What the service needs from storage. Writes take the event to append in the same
/// transaction.
#[async_trait]
pub trait UserStore: Send + Sync {
    /// `StoreError::Conflict` when the email is taken.
    async fn insert(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError>;
    /// `StoreError::Conflict` when the new email is taken. Writing another
    /// password hash moves the session epoch on (in the same statement).
    async fn update(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError>;
    /// The primary's copy (for a read-modify-write).
    async fn get(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError>;
    /// A read that may be served by a read replica within `consistency`; also how
    /// fresh it is (µs: every write before that time is in it).
    async fn read(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<(Option<UserRecord>, i64), StoreError>;
    async fn get_by_email(&self, email: &Email) -> Result<Option<UserRecord>, StoreError>;
    /// Users whose name or email contains `text` (case-insensitive), by id, after `after`.
    async fn search(
        &self,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<UserRecord>, StoreError>;
    /// The user's session epoch and the ids of signed-out tokens that expire
    /// after `now` (seconds since the epoch); `None` when the user does not exist.
    async fn session_state(&self, id: Uuid, now: i64) -> Result<Option<SessionState>, StoreError>;
    /// Records a signed-out token until it expires, with `event`, in one
    /// transaction. False when it was already recorded (nothing is appended).
    async fn end_session(
        &self,
        user_id: Uuid,
        token_id: Uuid,
        expires_at: i64,
        event: &NewEvent,
    ) -> Result<bool, StoreError>;
    /// Forgets signed-out tokens that expired before `cutoff`; how many.
    async fn forget_ended_sessions(&self, cutoff: i64) -> Result<u64, StoreError>;
}

/// The store for the configured database: with shards, the users live in the
/// shard databases and `db` keeps the directory of addresses.
pub fn store_for(db: &Database, shards: Option<&Shards>) -> std::sync::Arc<dyn UserStore> {
    match shards {
        Some(shards) => std::sync::Arc::new(ShardedUserStore::new(db.clone(), shards.clone())),
        None => std::sync::Arc::new(SqlUserStore::new(db.clone())),
    }
}

#[derive(Debug, FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    name: String,
    role: String,
    password_hash: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    session_epoch: i64,
}

impl TryFrom<UserRow> for UserRecord {
    type Error = StoreError;

    fn try_from(row: UserRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Other(format!("users row {}: bad {what}", row.id));
        Ok(Self {
            user: User {
                id: row.id,
                email: Email::parse(&row.email).map_err(|_| corrupt("email"))?,
                name: UserName::parse(&row.name).map_err(|_| corrupt("name"))?,
                role: Role::parse(&row.role).map_err(|_| corrupt("role"))?,
                created_at: row.created_at,
                updated_at: row.updated_at,
            },
            password_hash: PasswordHash(row.password_hash),
            session_epoch: row.session_epoch,
        })
    }
}

const INSERT: &str = "INSERT INTO users (id, email, name, role, password_hash, created_at, updated_at, \
                      search_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
// The right-hand sides read the row as it was: a new hash ends the sessions.
const UPDATE: &str = "UPDATE users SET email = $2, name = $3, role = $4, password_hash = $5, \
                      created_at = $6, updated_at = $7, search_key = $8, \
                      session_epoch = session_epoch + CASE WHEN password_hash = $5 THEN 0 ELSE 1 END \
                      WHERE id = $1";
const GET: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at, \
                   session_epoch FROM users WHERE id = $1";
const GET_BY_EMAIL: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at, \
                            session_epoch FROM users WHERE email = $1";
const SEARCH: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at, \
                      session_epoch FROM users \
                      WHERE ($1 IS NULL OR search_key LIKE $1 ESCAPE '\\') \
                      AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3";

const SESSION_STATE: &str = "SELECT u.session_epoch, e.session_id FROM users u \
                             LEFT JOIN ended_sessions e ON e.user_id = u.id AND e.expires_at > $2 \
                             WHERE u.id = $1";
const END_SESSION: &str = "INSERT INTO ended_sessions (session_id, user_id, expires_at) \
                           VALUES ($1, $2, $3) ON CONFLICT (session_id) DO NOTHING";
const FORGET_ENDED: &str = "DELETE FROM ended_sessions WHERE expires_at < $1";

/// What searches match: name and email, lower-cased in Rust (Unicode-aware on
/// both backends, unlike SQLite's ASCII-only `lower`).
fn search_key(user: &User) -> String {
    format!(
        "{}\u{1f}{}",
        user.name.as_str().to_lowercase(),
        user.email.as_str()
    )
}

/// Users in the configured database (SQLite or PostgreSQL; one SQL text).
#[derive(Debug, Clone)]
pub struct SqlUserStore {
    db: Database,
}

impl SqlUserStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn write(
        &self,
        sql: &'static str,
        record: &UserRecord,
        event: &NewEvent,
    ) -> Result<(), StoreError> {
        let user = &record.user;
        let mut tx = self.db.begin().await?;
        let done = with_tx!(&mut tx, conn => {
            sqlx::query(sql)
                .bind(user.id)
                .bind(user.email.as_str())
                .bind(user.name.as_str())
                .bind(user.role.as_str())
                .bind(&record.password_hash.0)
                .bind(user.created_at)
                .bind(user.updated_at)
                .bind(search_key(user))
                .execute(conn)
                .await?
                .rows_affected()
        });
        if done != 1 {
            return Err(StoreError::Other(format!("user {} not written", user.id)));
        }
        scaleshop_events::append(&mut tx, event).await?;
        tx.commit().await
    }
}

#[async_trait]
impl UserStore for SqlUserStore {
    async fn insert(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        self.write(INSERT, record, event).await
    }

    async fn update(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        self.write(UPDATE, record, event).await
    }

    async fn get(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> = with_pool!(self.db, pool => {
            sqlx::query_as(GET).bind(id).fetch_optional(pool).await?
        });
        row.map(UserRecord::try_from).transpose()
    }

    async fn read(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<(Option<UserRecord>, i64), StoreError> {
        let (row, as_of): (Option<UserRow>, i64) = read_with_as_of!(self.db, consistency, pool => {
            sqlx::query_as(GET).bind(id).fetch_optional(pool).await?
        })?;
        Ok((row.map(UserRecord::try_from).transpose()?, as_of))
    }

    async fn get_by_email(&self, email: &Email) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> = with_pool!(self.db, pool => {
            sqlx::query_as(GET_BY_EMAIL).bind(email.as_str()).fetch_optional(pool).await?
        });
        row.map(UserRecord::try_from).transpose()
    }

    async fn search(
        &self,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<UserRecord>, StoreError> {
        let pattern = text.map(scaleshop_db::like_contains);
        let rows: Vec<UserRow> = with_pool!(self.db, pool => {
            sqlx::query_as(SEARCH).bind(&pattern).bind(after).bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(UserRecord::try_from).collect()
    }

    async fn session_state(&self, id: Uuid, now: i64) -> Result<Option<SessionState>, StoreError> {
        let rows: Vec<(i64, Option<Uuid>)> = with_pool!(self.db, pool => {
            sqlx::query_as(SESSION_STATE).bind(id).bind(now).fetch_all(pool).await?
        });
        let Some((epoch, _)) = rows.first() else {
            return Ok(None);
        };
        let epoch = *epoch;
        let ended = rows.into_iter().filter_map(|(_, id)| id).collect();
        Ok(Some(SessionState::new(epoch, ended)))
    }

    async fn end_session(
        &self,
        user_id: Uuid,
        token_id: Uuid,
        expires_at: i64,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.db.begin().await?;
        let inserted = with_tx!(&mut tx, conn => {
            sqlx::query(END_SESSION)
                .bind(token_id)
                .bind(user_id)
                .bind(expires_at)
                .execute(conn)
                .await?
                .rows_affected()
        });
        if inserted == 0 {
            tx.commit().await?;
            return Ok(false);
        }
        scaleshop_events::append(&mut tx, event).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn forget_ended_sessions(&self, cutoff: i64) -> Result<u64, StoreError> {
        let mut tx = self.db.begin().await?;
        let deleted = with_tx!(&mut tx, conn => {
            sqlx::query(FORGET_ENDED).bind(cutoff).execute(conn).await?.rows_affected()
        });
        tx.commit().await?;
        Ok(deleted)
    }
}

/// How many users the database holds (a shard's count, for `shards status`).
pub async fn count(db: &Database) -> Result<i64, StoreError> {
    Ok(with_pool!(db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await?
    }))
}

/// How long a claimed address whose user was never written blocks it: far
/// longer than a sign-up can take (a request is cut off after its timeout, and
/// a dropped transaction rolls back), so a claim taken over is one whose write
/// can no longer commit.
const CLAIM_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// How many shards a scattered read asks at once, and how long it waits for one.
const SCATTER_CONCURRENCY: usize = 8;
const SCATTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Users spread over shard databases by their id's hash slot, with the
/// directory of addresses (`user_emails`) in the main database.
///
/// - Sign-up: the address is claimed in the directory (its primary key refuses
///   a second holder, whichever shard the other sign-up writes to), then the
///   user and its event are written to the user's shard; a failed write gives
///   the claim back.
/// - A change of address claims the new one first, writes the shard, then
///   gives the old one back.
/// - Sign-in by address: one directory row, then the user's shard. A row whose
///   user does not hold the address (a write that never happened, an old
///   address not yet given back) reads as no user, and a sign-up may take it
///   over after [`CLAIM_GRACE`].
/// - The admin search scatters over every shard (at most
///   [`SCATTER_CONCURRENCY`] at once, [`SCATTER_TIMEOUT`] each) and merges by
///   id: the order is global, so the last id of a page is every shard's
///   position.
#[derive(Debug, Clone)]
pub struct ShardedUserStore {
    directory: Database,
    shards: Shards,
}

impl ShardedUserStore {
    pub fn new(directory: Database, shards: Shards) -> Self {
        Self { directory, shards }
    }

    fn shard(&self, id: Uuid) -> SqlUserStore {
        SqlUserStore::new(self.shards.for_key(id).db().clone())
    }

    /// Claims `email` for `user_id` in the directory. `Conflict` when another
    /// user holds it: one whose shard has them with that address, or a claim
    /// younger than [`CLAIM_GRACE`].
    async fn claim(&self, email: &Email, user_id: Uuid) -> Result<(), StoreError> {
        const CLAIM: &str = "INSERT INTO user_emails (email, user_id, claimed_at) VALUES ($1, $2, $3) \
                             ON CONFLICT (email) DO NOTHING";
        const HOLDER: &str = "SELECT user_id, claimed_at FROM user_emails WHERE email = $1";
        const TAKE: &str = "UPDATE user_emails SET user_id = $2, claimed_at = $3 \
                            WHERE email = $1 AND user_id = $4";
        let at = scaleshop_db::clock::now_micros();
        let claimed = with_pool!(self.directory, pool => {
            sqlx::query(CLAIM).bind(email.as_str()).bind(user_id).bind(at)
                .execute(pool).await?.rows_affected()
        });
        if claimed == 1 {
            return Ok(());
        }
        let holder: Option<(Uuid, i64)> = with_pool!(self.directory, pool => {
            sqlx::query_as(HOLDER).bind(email.as_str()).fetch_optional(pool).await?
        });
        let taken = || StoreError::Conflict(Some("user_emails_pkey".into()));
        let Some((holder, claimed_at)) = holder else {
            // Given back meanwhile: try once more.
            let claimed = with_pool!(self.directory, pool => {
                sqlx::query(CLAIM).bind(email.as_str()).bind(user_id).bind(at)
                    .execute(pool).await?.rows_affected()
            });
            return if claimed == 1 { Ok(()) } else { Err(taken()) };
        };
        if holder == user_id {
            return Ok(());
        }
        let grace = i64::try_from(CLAIM_GRACE.as_micros()).unwrap_or(i64::MAX);
        if at - claimed_at < grace {
            return Err(taken());
        }
        let holds = self
            .shard(holder)
            .get(holder)
            .await?
            .is_some_and(|record| record.user.email == *email);
        if holds {
            return Err(taken());
        }
        let took = with_pool!(self.directory, pool => {
            sqlx::query(TAKE).bind(email.as_str()).bind(user_id).bind(at).bind(holder)
                .execute(pool).await?.rows_affected()
        });
        if took == 1 { Ok(()) } else { Err(taken()) }
    }

    /// Gives `email` back if `user_id` holds it.
    async fn give_back(&self, email: &Email, user_id: Uuid) -> Result<(), StoreError> {
        const GIVE: &str = "DELETE FROM user_emails WHERE email = $1 AND user_id = $2";
        with_pool!(self.directory, pool => {
            sqlx::query(GIVE).bind(email.as_str()).bind(user_id).execute(pool).await?;
        });
        Ok(())
    }

    /// Gives the claim back after a failed write, keeping the write's error.
    async fn undo_claim(&self, email: &Email, user_id: Uuid, error: StoreError) -> StoreError {
        if let Err(e) = self.give_back(email, user_id).await {
            // The claim stays until a sign-up takes it over after the grace.
            tracing::warn!(%user_id, error = %e, "claimed address not given back");
        }
        error
    }
}

#[async_trait]
impl UserStore for ShardedUserStore {
    async fn insert(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        let user = &record.user;
        self.claim(&user.email, user.id).await?;
        match self.shard(user.id).insert(record, event).await {
            Ok(()) => Ok(()),
            Err(error) => Err(self.undo_claim(&user.email, user.id, error).await),
        }
    }

    async fn update(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        let user = &record.user;
        let shard = self.shard(user.id);
        let before = shard
            .get(user.id)
            .await?
            .ok_or_else(|| StoreError::Other(format!("user {} not written", user.id)))?;
        if before.user.email == user.email {
            return shard.update(record, event).await;
        }
        self.claim(&user.email, user.id).await?;
        if let Err(error) = shard.update(record, event).await {
            return Err(self.undo_claim(&user.email, user.id, error).await);
        }
        if let Err(e) = self.give_back(&before.user.email, user.id).await {
            // The old address reads as no user (the shard has the new one) and
            // is taken over by a sign-up after the grace.
            tracing::warn!(user_id = %user.id, error = %e, "old address not given back");
        }
        Ok(())
    }

    async fn get(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        self.shard(id).get(id).await
    }

    async fn read(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<(Option<UserRecord>, i64), StoreError> {
        self.shard(id).read(id, consistency).await
    }

    async fn get_by_email(&self, email: &Email) -> Result<Option<UserRecord>, StoreError> {
        const LOOKUP: &str = "SELECT user_id FROM user_emails WHERE email = $1";
        let holder: Option<Uuid> = with_pool!(self.directory, pool => {
            sqlx::query_scalar(LOOKUP).bind(email.as_str()).fetch_optional(pool).await?
        });
        let Some(id) = holder else {
            return Ok(None);
        };
        Ok(self
            .shard(id)
            .get(id)
            .await?
            .filter(|record| record.user.email == *email))
    }

    async fn search(
        &self,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<UserRecord>, StoreError> {
        use futures::StreamExt;
        let pages: Vec<Result<Vec<UserRecord>, StoreError>> =
            futures::stream::iter(self.shards.all().iter().cloned())
                .map(|shard| async move {
                    let store = SqlUserStore::new(shard.db().clone());
                    tokio::time::timeout(SCATTER_TIMEOUT, store.search(text, after, limit))
                        .await
                        .unwrap_or_else(|_| {
                            tracing::warn!(
                                shard = shard.name(),
                                "user search timed out on a shard"
                            );
                            Err(StoreError::Unavailable)
                        })
                })
                .buffer_unordered(SCATTER_CONCURRENCY)
                .collect()
                .await;
        let mut merged: Vec<UserRecord> = Vec::new();
        for page in pages {
            merged.extend(page?);
        }
        // A user being moved between shards may be read on both: once only.
        merged.sort_by_key(|record| record.user.id);
        merged.dedup_by_key(|record| record.user.id);
        merged.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(merged)
    }

    async fn session_state(&self, id: Uuid, now: i64) -> Result<Option<SessionState>, StoreError> {
        self.shard(id).session_state(id, now).await
    }

    async fn end_session(
        &self,
        user_id: Uuid,
        token_id: Uuid,
        expires_at: i64,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        self.shard(user_id)
            .end_session(user_id, token_id, expires_at, event)
            .await
    }

    async fn forget_ended_sessions(&self, cutoff: i64) -> Result<u64, StoreError> {
        let mut forgotten = 0;
        for shard in self.shards.all() {
            forgotten += SqlUserStore::new(shard.db().clone())
                .forget_ended_sessions(cutoff)
                .await?;
        }
        Ok(forgotten)
    }
}
