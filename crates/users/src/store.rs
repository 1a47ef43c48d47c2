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
                      search_key, slot) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
// The right-hand sides read the row as it was: a new hash ends the sessions.
const UPDATE: &str = "UPDATE users SET email = $2, name = $3, role = $4, password_hash = $5, \
                      created_at = $6, updated_at = $7, search_key = $8, slot = $9, \
                      session_epoch = session_epoch + CASE WHEN password_hash = $5 THEN 0 ELSE 1 END \
                      WHERE id = $1";
/// [`UPDATE`] only if the row still has the address `$10`.
const UPDATE_IF_EMAIL: &str = "UPDATE users SET email = $2, name = $3, role = $4, password_hash = $5, \
                      created_at = $6, updated_at = $7, search_key = $8, slot = $9, \
                      session_epoch = session_epoch + CASE WHEN password_hash = $5 THEN 0 ELSE 1 END \
                      WHERE id = $1 AND email = $10";
const GET: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at, \
                   session_epoch FROM users WHERE id = $1";
const GET_BY_EMAIL: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at, \
                            session_epoch FROM users WHERE email = $1";
const SEARCH: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at, \
                      session_epoch FROM users \
                      WHERE ($1 IS NULL OR search_key LIKE $1 ESCAPE '\\') \
                      AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3";
/// The same, on a shard: only the users of the slots it holds (a move's copy
/// on the target, or a source's rows before they are deleted, are not its).
const SEARCH_HELD: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at, \
                           session_epoch FROM users \
                           WHERE ($1 IS NULL OR search_key LIKE $1 ESCAPE '\\') \
                           AND ($2 IS NULL OR id > $2) \
                           AND slot IN (SELECT slot FROM owned_slots) ORDER BY id LIMIT $3";

const SESSION_STATE: &str = "SELECT u.session_epoch, e.session_id FROM users u \
                             LEFT JOIN ended_sessions e ON e.user_id = u.id AND e.expires_at > $2 \
                             WHERE u.id = $1";
const END_SESSION: &str = "INSERT INTO ended_sessions (session_id, user_id, expires_at, ended_at) \
                           VALUES ($1, $2, $3, $4) ON CONFLICT (session_id) DO NOTHING";
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

    /// Writes `record` with `event`. With `guard`, only if this shard serves
    /// the user's slot: `Ok(false)` (nothing written) when it does not.
    async fn write(
        &self,
        sql: &'static str,
        record: &UserRecord,
        event: &NewEvent,
        guard: bool,
    ) -> Result<bool, StoreError> {
        self.write_expecting(sql, record, event, guard, None).await
    }

    /// [`SqlUserStore::write`]; with `expect`, `sql` takes the address the row
    /// must still have as `$10`, and a row that changed meanwhile is a
    /// `Conflict`.
    async fn write_expecting(
        &self,
        sql: &'static str,
        record: &UserRecord,
        event: &NewEvent,
        guard: bool,
        expect: Option<&Email>,
    ) -> Result<bool, StoreError> {
        let user = &record.user;
        let slot = scaleshop_db::shards::slot_of(user.id);
        let mut tx = self.db.begin().await?;
        if guard && !scaleshop_db::shards::serving(&mut tx, slot).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        let done = with_tx!(&mut tx, conn => {
            let query = sqlx::query(sql)
                .bind(user.id)
                .bind(user.email.as_str())
                .bind(user.name.as_str())
                .bind(user.role.as_str())
                .bind(&record.password_hash.0)
                .bind(user.created_at)
                .bind(user.updated_at)
                .bind(search_key(user))
                .bind(i32::from(slot));
            match expect {
                Some(email) => query.bind(email.as_str()).execute(conn).await?,
                None => query.execute(conn).await?,
            }
            .rows_affected()
        });
        if done != 1 && expect.is_some() {
            return Err(StoreError::Conflict(Some("users_email_changed".into())));
        }
        if done != 1 {
            return Err(StoreError::Other(format!("user {} not written", user.id)));
        }
        scaleshop_events::append(&mut tx, event).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// [`UserStore::end_session`], with `guard` as in [`SqlUserStore::write`]:
    /// `None` when this shard does not serve the user's slot.
    async fn end_session_guarded(
        &self,
        user_id: Uuid,
        token_id: Uuid,
        expires_at: i64,
        event: &NewEvent,
        guard: bool,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = self.db.begin().await?;
        if guard
            && !scaleshop_db::shards::serving(&mut tx, scaleshop_db::shards::slot_of(user_id))
                .await?
        {
            tx.rollback().await?;
            return Ok(None);
        }
        let inserted = with_tx!(&mut tx, conn => {
            sqlx::query(END_SESSION)
                .bind(token_id)
                .bind(user_id)
                .bind(expires_at)
                .bind(scaleshop_db::clock::now_micros())
                .execute(conn)
                .await?
                .rows_affected()
        });
        if inserted == 0 {
            tx.commit().await?;
            return Ok(Some(false));
        }
        scaleshop_events::append(&mut tx, event).await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    async fn search_in(
        &self,
        sql: &'static str,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<UserRecord>, StoreError> {
        let pattern = text.map(scaleshop_db::like_contains);
        let rows: Vec<UserRow> = with_pool!(self.db, pool => {
            sqlx::query_as(sql).bind(&pattern).bind(after).bind(limit).fetch_all(pool).await?
        });
        rows.into_iter().map(UserRecord::try_from).collect()
    }
}

#[async_trait]
impl UserStore for SqlUserStore {
    async fn insert(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        self.write(INSERT, record, event, false).await.map(drop)
    }

    async fn update(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        self.write(UPDATE, record, event, false).await.map(drop)
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
        self.search_in(SEARCH, text, after, limit).await
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
        self.end_session_guarded(user_id, token_id, expires_at, event, false)
            .await
            .map(|ended| ended.unwrap_or(false))
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

/// How many users a shard holds (those of the slots it holds: not a move's
/// copy before it takes over, nor a source's rows before they are deleted).
pub async fn count_held(db: &Database) -> Result<i64, StoreError> {
    const Q: &str = "SELECT COUNT(*) FROM users WHERE slot IN (SELECT slot FROM owned_slots)";
    Ok(with_pool!(db, pool => sqlx::query_scalar(Q).fetch_one(pool).await?))
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

    /// Runs `op` on the shard the map names for `id`, with the key's slot;
    /// `op` gives `None` when that shard refused the slot (a move took it):
    /// the map is read again and `op` runs on the shard it names now, for at
    /// most [`REFUSED_FOR`] (then the database is unavailable: 503).
    async fn on_shard<T, F, Fut>(&self, id: Uuid, op: F) -> Result<T, StoreError>
    where
        F: Fn(SqlUserStore, u16) -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, StoreError>>,
    {
        let slot = scaleshop_db::shards::slot_of(id);
        let deadline = tokio::time::Instant::now() + REFUSED_FOR;
        loop {
            let store = SqlUserStore::new(self.shards.for_key(id).db().clone());
            if let Some(done) = op(store, slot).await? {
                return Ok(done);
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(slot, "no shard took the slot in time");
                return Err(StoreError::Unavailable);
            }
            self.shards.refused().await?;
        }
    }

    /// A read on the user's shard, kept only if the shard still holds the
    /// slot after it (then its rows were the truth when read).
    async fn read_held<T, F, Fut>(&self, id: Uuid, read: F) -> Result<T, StoreError>
    where
        F: Fn(SqlUserStore) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.on_shard(id, |store, slot| {
            let read = read(store.clone());
            async move {
                let value = read.await?;
                let current = self.shards.read_was_current(&store.db, slot).await?;
                Ok(current.then_some(value))
            }
        })
        .await
    }

    /// Writes `record` on its shard; an update only if the row still has the
    /// address `expect` (the directory's claim was made for it).
    async fn write(
        &self,
        sql: &'static str,
        record: &UserRecord,
        event: &NewEvent,
        expect: Option<&Email>,
    ) -> Result<(), StoreError> {
        self.on_shard(record.user.id, |store, _| async move {
            Ok(store
                .write_expecting(sql, record, event, true, expect)
                .await?
                .then_some(()))
        })
        .await
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
            // Renewed, so that no one takes it over while this write runs.
            const RENEW: &str =
                "UPDATE user_emails SET claimed_at = $3 WHERE email = $1 AND user_id = $2";
            let renewed = with_pool!(self.directory, pool => {
                sqlx::query(RENEW).bind(email.as_str()).bind(user_id).bind(at)
                    .execute(pool).await?.rows_affected()
            });
            return if renewed == 1 { Ok(()) } else { Err(taken()) };
        }
        let grace = i64::try_from(CLAIM_GRACE.as_micros()).unwrap_or(i64::MAX);
        if at - claimed_at < grace {
            return Err(taken());
        }
        let holds = self
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

    /// One page of the search on every shard at once, merged by id.
    async fn scatter(
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
                    let page = store.search_in(SEARCH_HELD, text, after, limit);
                    tokio::time::timeout(SCATTER_TIMEOUT, page)
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
        // Between a move's flip and the source giving the slots up, both
        // shards hold them: each user once, the newer copy.
        merged.sort_by(|a, b| {
            a.user
                .id
                .cmp(&b.user.id)
                .then(b.user.updated_at.cmp(&a.user.updated_at))
        });
        merged.dedup_by_key(|record| record.user.id);
        merged.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(merged)
    }
}

/// How long a user's read or write keeps looking for the shard that takes its
/// slot (a move's fence lasts milliseconds).
const REFUSED_FOR: std::time::Duration = std::time::Duration::from_secs(3);

#[async_trait]
impl UserStore for ShardedUserStore {
    async fn insert(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        let user = &record.user;
        self.claim(&user.email, user.id).await?;
        match self.write(INSERT, record, event, None).await {
            Ok(()) => Ok(()),
            Err(error) => Err(self.undo_claim(&user.email, user.id, error).await),
        }
    }

    async fn update(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError> {
        let user = &record.user;
        let before = self
            .get(user.id)
            .await?
            .ok_or_else(|| StoreError::Other(format!("user {} not written", user.id)))?;
        // Each update expects the address the row had when read: a concurrent
        // change of address makes it fail (409) rather than write an address
        // back that the directory has given away.
        if before.user.email == user.email {
            return self
                .write(UPDATE_IF_EMAIL, record, event, Some(&before.user.email))
                .await;
        }
        self.claim(&user.email, user.id).await?;
        if let Err(error) = self
            .write(UPDATE_IF_EMAIL, record, event, Some(&before.user.email))
            .await
        {
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
        self.read_held(id, |store| async move { store.get(id).await })
            .await
    }

    async fn read(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<(Option<UserRecord>, i64), StoreError> {
        self.read_held(id, |store| async move { store.read(id, consistency).await })
            .await
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
        // The shards are read one after the other: a move that flipped in
        // between could hide its slots from both reads. The map's epoch
        // before and after tells; then the page is read again.
        for _ in 0..5 {
            self.shards
                .reload()
                .await
                .map_err(|e| StoreError::Other(e.to_string()))?;
            let epoch = self.shards.map().epoch();
            let page = self.scatter(text, after, limit).await?;
            self.shards
                .reload()
                .await
                .map_err(|e| StoreError::Other(e.to_string()))?;
            if self.shards.map().epoch() == epoch {
                return Ok(page);
            }
        }
        Err(StoreError::Unavailable)
    }

    async fn session_state(&self, id: Uuid, now: i64) -> Result<Option<SessionState>, StoreError> {
        self.read_held(
            id,
            |store| async move { store.session_state(id, now).await },
        )
        .await
    }

    async fn end_session(
        &self,
        user_id: Uuid,
        token_id: Uuid,
        expires_at: i64,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        self.on_shard(user_id, |store, _| async move {
            store
                .end_session_guarded(user_id, token_id, expires_at, event, true)
                .await
        })
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

/// The users' rows in the shards, as a move copies them: each user of the
/// slots changed since the last pass, and their sessions ended since then.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserSlotRows;

/// Rows a copy statement takes at once.
const COPY_BATCH: i64 = 500;

#[derive(Debug, FromRow)]
struct CopiedUser {
    id: Uuid,
    email: String,
    name: String,
    role: String,
    password_hash: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    session_epoch: i64,
    search_key: String,
    slot: i32,
}

#[async_trait]
impl scaleshop_db::shards::SlotRows for UserSlotRows {
    async fn copy(
        &self,
        source: &Database,
        target: &Database,
        slots: &[u16],
        since: i64,
    ) -> Result<u64, StoreError> {
        const UPSERT: &str = "INSERT INTO users (id, email, name, role, password_hash, created_at, \
                              updated_at, session_epoch, search_key, slot) \
                              VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                              ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name, \
                              role = excluded.role, password_hash = excluded.password_hash, \
                              updated_at = excluded.updated_at, session_epoch = excluded.session_epoch, \
                              search_key = excluded.search_key, slot = excluded.slot";
        const ENDED: &str = "INSERT INTO ended_sessions (session_id, user_id, expires_at, ended_at) \
                             VALUES ($1, $2, $3, $4) ON CONFLICT (session_id) DO NOTHING";
        let since_micros = since;
        let since = DateTime::<Utc>::from_timestamp_micros(since).unwrap_or_default();
        let list = slots
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let users_sql = format!(
            "SELECT id, email, name, role, password_hash, created_at, updated_at, session_epoch, \
             search_key, slot FROM users WHERE slot IN ({list}) AND updated_at >= $1 \
             AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3"
        );
        let ended_sql = format!(
            "SELECT e.session_id, e.user_id, e.expires_at, e.ended_at FROM ended_sessions e \
             JOIN users u ON u.id = e.user_id WHERE u.slot IN ({list}) AND e.ended_at >= $3 \
             AND ($1 IS NULL OR e.session_id > $1) ORDER BY e.session_id LIMIT $2"
        );
        let mut copied = 0_u64;
        let mut after: Option<Uuid> = None;
        loop {
            let sql = sqlx::AssertSqlSafe(users_sql.clone());
            let rows: Vec<CopiedUser> = with_pool!(source, pool => {
                sqlx::query_as(sql).bind(since).bind(after).bind(COPY_BATCH).fetch_all(pool).await?
            });
            let Some(last) = rows.last().map(|r| r.id) else {
                break;
            };
            let mut tx = target.begin().await?;
            for row in &rows {
                with_tx!(&mut tx, conn => {
                    sqlx::query(UPSERT)
                        .bind(row.id).bind(&row.email).bind(&row.name).bind(&row.role)
                        .bind(&row.password_hash).bind(row.created_at).bind(row.updated_at)
                        .bind(row.session_epoch).bind(&row.search_key).bind(row.slot)
                        .execute(conn).await?;
                });
            }
            tx.commit().await?;
            copied += rows.len() as u64;
            after = Some(last);
        }
        let mut after: Option<Uuid> = None;
        loop {
            let sql = sqlx::AssertSqlSafe(ended_sql.clone());
            let rows: Vec<(Uuid, Uuid, i64, i64)> = with_pool!(source, pool => {
                sqlx::query_as(sql).bind(after).bind(COPY_BATCH).bind(since_micros)
                    .fetch_all(pool).await?
            });
            let Some(last) = rows.last().map(|r| r.0) else {
                break;
            };
            let mut tx = target.begin().await?;
            for (session, user, expires, ended) in &rows {
                with_tx!(&mut tx, conn => {
                    sqlx::query(ENDED).bind(session).bind(user).bind(expires).bind(ended)
                        .execute(conn).await?;
                });
            }
            tx.commit().await?;
            copied += rows.len() as u64;
            after = Some(last);
        }
        Ok(copied)
    }

    async fn delete(&self, db: &Database, slots: &[u16]) -> Result<u64, StoreError> {
        let list = slots
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let ended = sqlx::AssertSqlSafe(format!(
            "DELETE FROM ended_sessions WHERE user_id IN (SELECT id FROM users WHERE slot IN ({list}))"
        ));
        let users = sqlx::AssertSqlSafe(format!("DELETE FROM users WHERE slot IN ({list})"));
        let mut tx = db.begin().await?;
        let deleted = with_tx!(&mut tx, conn => {
            sqlx::query(ended).execute(&mut *conn).await?;
            sqlx::query(users).execute(conn).await?.rows_affected()
        });
        tx.commit().await?;
        Ok(deleted)
    }
}
