//! The event log. Every state change that others must hear about appends its event
//! here **in the same transaction** as the change ([`append_sqlite`] /
//! [`append_postgres`] take the caller's connection), so an event exists if and only
//! if its change committed. The `events` table is the outbox and the log at once;
//! `sequence` is the global, gap-tolerant commit order.
//!
//! This crate knows the envelope, never the meaning of an event: it does not depend
//! on any service.

use chrono::{DateTime, SubsecRound, Utc};
use scaleshop_db::sqlx::types::Json;
use scaleshop_db::sqlx::{self, FromRow, PgConnection, SqliteConnection};
use scaleshop_db::{Database, Migrations, StoreError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod http;

/// Version of the envelope and of every payload shape published today.
pub const VERSION: i32 = 1;

/// The tables this crate owns.
pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "events",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Uuid,
    pub kind: &'static str,
    pub aggregate_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(kind: &'static str, aggregate_id: Uuid, data: serde_json::Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind,
            aggregate_id,
            occurred_at: Utc::now().trunc_subsecs(6),
            data,
        }
    }
}

/// A committed event: the envelope of the contract, also what the bus carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, FromRow, utoipa::ToSchema)]
pub struct Event {
    pub id: Uuid,
    pub sequence: i64,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub kind: String,
    pub version: i32,
    pub aggregate_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub data: Json<serde_json::Value>,
}

const INSERT: &str = "INSERT INTO events (id, type, version, aggregate_id, occurred_at, data) \
                      VALUES ($1, $2, $3, $4, $5, $6) RETURNING sequence";

/// Appends inside the caller's SQLite transaction (SQLite serializes writers, so
/// sequence order is commit order). Returns the sequence.
pub async fn append_sqlite(
    conn: &mut SqliteConnection,
    event: &NewEvent,
) -> Result<i64, StoreError> {
    let sequence: i64 = sqlx::query_scalar(INSERT)
        .bind(event.id)
        .bind(event.kind)
        .bind(VERSION)
        .bind(event.aggregate_id)
        .bind(event.occurred_at)
        .bind(Json(&event.data))
        .fetch_one(conn)
        .await?;
    Ok(sequence)
}

/// Appends inside the caller's PostgreSQL transaction. The transaction-scoped
/// advisory lock makes appenders commit in sequence order, so a reader that has seen
/// sequence N will never later find a smaller one appear. Append last, just before
/// commit, to hold the lock briefly.
pub async fn append_postgres(conn: &mut PgConnection, event: &NewEvent) -> Result<i64, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(727001)")
        .execute(&mut *conn)
        .await?;
    let sequence: i64 = sqlx::query_scalar(INSERT)
        .bind(event.id)
        .bind(event.kind)
        .bind(VERSION)
        .bind(event.aggregate_id)
        .bind(event.occurred_at)
        .bind(Json(&event.data))
        .fetch_one(conn)
        .await?;
    Ok(sequence)
}

/// Read access to the log.
#[derive(Debug, Clone)]
pub struct EventLog {
    db: Database,
}

const LIST: &str = "SELECT sequence, id, type, version, aggregate_id, occurred_at, data \
                    FROM events WHERE sequence > $1 ORDER BY sequence LIMIT $2";

impl EventLog {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Events after `after` (exclusive), ascending.
    pub async fn list(&self, after: i64, limit: i64) -> Result<Vec<Event>, StoreError> {
        let rows = match &self.db {
            Database::Sqlite(pool) => {
                sqlx::query_as(LIST)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
            Database::Postgres(pool) => {
                sqlx::query_as(LIST)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
        };
        Ok(rows)
    }

    /// Events about one aggregate, ascending.
    pub async fn for_aggregate(&self, aggregate_id: Uuid) -> Result<Vec<Event>, StoreError> {
        const Q: &str = "SELECT sequence, id, type, version, aggregate_id, occurred_at, data \
                         FROM events WHERE aggregate_id = $1 ORDER BY sequence";
        let rows = match &self.db {
            Database::Sqlite(pool) => sqlx::query_as(Q).bind(aggregate_id).fetch_all(pool).await?,
            Database::Postgres(pool) => {
                sqlx::query_as(Q).bind(aggregate_id).fetch_all(pool).await?
            }
        };
        Ok(rows)
    }
}
