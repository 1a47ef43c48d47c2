//! Storage port of the users service and its two adapters (SQLite, PostgreSQL).
//! Both run the same SQL; the macro below keeps them one text.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
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

/// The store for the configured database.
pub fn store_for(db: &Database) -> std::sync::Arc<dyn UserStore> {
    std::sync::Arc::new(SqlUserStore::new(db.clone()))
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
