//! The event log. Every state change that others must hear about appends its event
//! here **in the same transaction** as the change ([`append`] takes the caller's
//! transaction), so an event exists if and only if its change committed. The
//! `events` table is the outbox and the log at once; `sequence` is the commit
//! order.
//!
//! The [`dispatch::Dispatcher`] delivers the log to consumers in order, at least
//! once, and each consumer's inbox (written in the consumer's own transaction)
//! makes the effect exactly once.
//!
//! This crate knows the envelope, never the meaning of an event: it depends on no
//! service. Payloads are the typed contracts of `scaleshop-contracts`: a producer
//! builds its event with [`NewEvent::typed`], a consumer reads one with
//! [`Event::decode`] or an [`EventSet`]; the envelope carries the payload's
//! version, and an event a consumer cannot read (a newer version, a bad shape) is
//! parked as dead for it at once, unless the consumer is a read model, which
//! retries it (see [`HandlerError::permanent`]).

use chrono::{DateTime, SubsecRound, Utc};
use scaleshop_db::sqlx::types::Json;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{
    COMMIT_CHANNEL, Database, Migrations, StoreError, Topic, Tx, with_pool, with_tx,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod dispatch;
pub mod http;
pub mod nats;
pub mod projection;
pub mod tail;

pub use dispatch::{Consumer, DeadEvent, Dispatcher, DispatcherSettings, HandlerError};
pub use projection::Projection;
pub use scaleshop_contracts::{Contract, DecodeError, Envelope, EventSet};

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
    /// The version of the payload's contract.
    pub version: u32,
    pub aggregate_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl NewEvent {
    /// The event of a contract: its name and version from the contract's type, its
    /// data the payload's JSON. How every service builds its events.
    pub fn typed<C: Contract>(aggregate_id: Uuid, payload: &C) -> Result<Self, StoreError> {
        let data = payload
            .encode()
            .map_err(|e| StoreError::Other(e.to_string()))?;
        Ok(Self::raw(C::NAME, C::VERSION, aggregate_id, data))
    }

    /// An event from its parts, with no contract behind it: for tests and
    /// benchmarks of the log itself, which carry made-up events.
    pub fn raw(
        kind: &'static str,
        version: u32,
        aggregate_id: Uuid,
        data: serde_json::Value,
    ) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind,
            version,
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
    /// The trace the event belongs to (W3C `traceparent`), when traces are on.
    /// Carried beside the event, never in it: a column of the log and a header
    /// of the NATS message.
    #[serde(skip)]
    pub traceparent: Option<String>,
}

impl Envelope for Event {
    fn name(&self) -> &str {
        &self.kind
    }

    fn version(&self) -> i64 {
        i64::from(self.version)
    }

    fn data(&self) -> &serde_json::Value {
        &self.data.0
    }
}

impl Event {
    /// Reads this event as the contract `C` (see [`Contract::decode`]). A
    /// consumer returns the error as is: it becomes a permanent [`HandlerError`].
    pub fn decode<C: Contract>(&self) -> Result<C, DecodeError> {
        C::decode(self)
    }
}

const INSERT: &str = "INSERT INTO events (id, type, version, aggregate_id, occurred_at, data, traceparent) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING sequence";

/// Appends inside the caller's transaction; returns the sequence.
///
/// SQLite serializes writers, so sequence order is commit order. On PostgreSQL a
/// transaction-scoped advisory lock makes appenders commit in sequence order, so a
/// reader that has seen sequence N never later finds a smaller one appear; and a
/// `NOTIFY` on [`scaleshop_db::COMMIT_CHANNEL`] (delivered at commit) wakes
/// dispatchers in every process. Append last,
/// just before commit, to hold the lock briefly.
pub async fn append(tx: &mut Tx, event: &NewEvent) -> Result<i64, StoreError> {
    let version = i32::try_from(event.version).map_err(|_| {
        StoreError::Other(format!("event version {} is out of range", event.version))
    })?;
    // The publication's span; its consumers' spans are its children.
    let span = tracing::info_span!(
        target: scaleshop_telemetry::trace::SPANS,
        "publish",
        otel.name = format!("publish {}", event.kind),
        otel.kind = "producer",
        messaging.destination.name = event.kind,
        messaging.message.id = %event.id,
    );
    let traceparent = scaleshop_telemetry::trace::traceparent_of(&span);
    // Not entered (it would be held across awaits): open while the insert runs.
    let _span = span;
    tx.wake_on_commit(Topic::Events);
    let notice = tx.notice(Topic::Events);
    if let Tx::Postgres(tx, _) = tx {
        sqlx::query("SELECT pg_advisory_xact_lock(727001), pg_notify($1, $2)")
            .bind(COMMIT_CHANNEL)
            .bind(notice)
            .execute(&mut **tx)
            .await?;
    }
    let sequence: i64 = with_tx!(tx, conn => {
        sqlx::query_scalar(INSERT)
            .bind(event.id)
            .bind(event.kind)
            .bind(version)
            .bind(event.aggregate_id)
            .bind(event.occurred_at)
            .bind(Json(&event.data))
            .bind(traceparent.as_deref())
            .fetch_one(conn)
            .await?
    });
    Ok(sequence)
}

const COLUMNS: &str = "sequence, id, type, version, aggregate_id, occurred_at, data, traceparent";

/// Read access to the log.
#[derive(Debug, Clone)]
pub struct EventLog {
    db: Database,
}

impl EventLog {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Events after `after` (exclusive), ascending.
    pub async fn list(&self, after: i64, limit: i64) -> Result<Vec<Event>, StoreError> {
        const Q: &str = "SELECT sequence, id, type, version, aggregate_id, occurred_at, data, \
                         traceparent FROM events WHERE sequence > $1 ORDER BY sequence LIMIT $2";
        debug_assert!(Q.contains(COLUMNS));
        Ok(with_pool!(self.db, pool => {
            sqlx::query_as(Q).bind(after).bind(limit).fetch_all(pool).await?
        }))
    }

    /// One event by id.
    pub async fn get(&self, id: Uuid) -> Result<Option<Event>, StoreError> {
        const Q: &str = "SELECT sequence, id, type, version, aggregate_id, occurred_at, data, \
                         traceparent FROM events WHERE id = $1";
        Ok(with_pool!(self.db, pool => {
            sqlx::query_as(Q).bind(id).fetch_optional(pool).await?
        }))
    }

    /// The newest sequence (0 for an empty log).
    pub async fn head(&self) -> Result<i64, StoreError> {
        const Q: &str = "SELECT COALESCE(MAX(sequence), 0) FROM events";
        let head: i64 = with_pool!(self.db, pool => sqlx::query_scalar(Q).fetch_one(pool).await?);
        Ok(head)
    }
}
