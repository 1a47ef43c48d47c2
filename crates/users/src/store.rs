//! Storage port of the users service and its two adapters (SQLite, PostgreSQL).
//! Both run the same SQL; the macro below keeps them one text.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Database, Migrations, StoreError, with_pool, with_tx};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::domain::{Email, PasswordHash, Role, User, UserName, UserRecord};

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
    /// `StoreError::Conflict` when the new email is taken.
    async fn update(&self, record: &UserRecord, event: &NewEvent) -> Result<(), StoreError>;
    async fn get(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError>;
    async fn get_by_email(&self, email: &Email) -> Result<Option<UserRecord>, StoreError>;
    /// Users whose name or email contains `text` (case-insensitive), by id, after `after`.
    async fn search(
        &self,
        text: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<UserRecord>, StoreError>;
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
        })
    }
}

const INSERT: &str = "INSERT INTO users (id, email, name, role, password_hash, created_at, updated_at, \
                      search_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const UPDATE: &str = "UPDATE users SET email = $2, name = $3, role = $4, password_hash = $5, \
                      created_at = $6, updated_at = $7, search_key = $8 WHERE id = $1";
const GET: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at \
                   FROM users WHERE id = $1";
const GET_BY_EMAIL: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at \
                            FROM users WHERE email = $1";
const SEARCH: &str = "SELECT id, email, name, role, password_hash, created_at, updated_at FROM users \
                      WHERE ($1 IS NULL OR search_key LIKE $1 ESCAPE '\\') \
                      AND ($2 IS NULL OR id > $2) ORDER BY id LIMIT $3";

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
}
