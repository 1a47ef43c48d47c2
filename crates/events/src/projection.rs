//! Read models kept in tables (CQRS projections): a [`Projection`] is a
//! [`Consumer`] whose effects are a table of its own, built only from events.
//! This module gives every such projection what the search index has on disk:
//! a state (`catching_up`, `live`, `rebuilding`, `stuck`), a digest of its rows,
//! a bounded wait for read-your-writes, and a rebuild from the whole log.
//!
//! A rebuild takes the consumer's lease from whichever process holds it (its
//! in-flight batch then fails its fenced position move and rolls back), empties
//! the table, its inbox and its position in one transaction, records the head of
//! the log as `rebuild_to`, and delivers the log again through the same code as
//! the dispatcher, then hands the lease back. Until the position is back at
//! `rebuild_to`, [`serving`] is false and reads are answered by the command
//! side. A rebuilder that dies lets its lease run out; the consumer's usual
//! runner then goes on from the position the rebuild reached, so a crash in the
//! middle loses nothing and applies nothing twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scaleshop_db::clock::after;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Database, StoreError, Tx, with_pool, with_tx};
use serde::Serialize;
use uuid::Uuid;

use crate::EventLog;
use crate::dispatch::{Consumer, DispatcherSettings, Runner, Step};

/// A read model in tables of its own, built only by this consumer's handler.
#[async_trait]
pub trait Projection: Consumer {
    /// Deletes every row of the read model (in the rebuild's transaction).
    async fn clear(&self, tx: &mut Tx) -> Result<(), StoreError>;
    /// How many rows it holds, and a SHA-256 (hex) of them in key order: two
    /// copies with the same digest hold the same rows.
    async fn digest(&self, db: &Database) -> Result<(u64, String), StoreError>;
}

/// A digest of a read model's rows, fed in key order: each row as its typed
/// value reads (its `Debug` form), one line each.
#[derive(Default)]
pub struct Digest {
    hasher: sha2::Sha256,
    rows: u64,
}

impl Digest {
    pub fn row(&mut self, row: &impl std::fmt::Debug) {
        use sha2::Digest as _;
        self.hasher.update(format!("{row:?}\n").as_bytes());
        self.rows += 1;
    }

    /// The number of rows and the hex SHA-256.
    pub fn finish(self) -> (u64, String) {
        use sha2::Digest as _;
        (self.rows, hex::encode(self.hasher.finalize()))
    }
}

/// Where a projection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = TableProjectionState)]
pub enum State {
    /// Being built again from the log; reads go to the command side.
    Rebuilding,
    /// Following the log; reads with a token wait for it (bounded).
    Live,
    /// An event could not be applied and is being retried.
    Stuck,
}

/// A table projection as `GET /v1/projections` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = TableProjectionStatus)]
pub struct Status {
    pub name: &'static str,
    pub state: State,
    /// The last event of the log applied.
    pub position: i64,
    /// Events of the log not applied yet.
    pub lag: i64,
    /// Rows of the read model.
    pub documents: u64,
    /// SHA-256 of every row in key order (see [`Projection::digest`]).
    pub digest: String,
    /// Why the projection is stuck, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, FromRow)]
struct Row {
    position: i64,
    attempts: i32,
    last_error: Option<String>,
    rebuild_to: Option<i64>,
}

async fn row(db: &Database, name: &str) -> Result<Option<Row>, StoreError> {
    const Q: &str =
        "SELECT position, attempts, last_error, rebuild_to FROM event_consumers WHERE name = $1";
    Ok(with_pool!(db, pool => sqlx::query_as(Q).bind(name).fetch_optional(pool).await?))
}

/// The state, position, lag and digest of `projection`.
pub async fn status(db: &Database, projection: &dyn Projection) -> Result<Status, StoreError> {
    let name = projection.name();
    let head = EventLog::new(db.clone()).head().await?;
    let row = row(db, name).await?.unwrap_or(Row {
        position: 0,
        attempts: 0,
        last_error: None,
        rebuild_to: None,
    });
    let (documents, digest) = projection.digest(db).await?;
    let state = if row.rebuild_to.is_some_and(|to| row.position < to) {
        State::Rebuilding
    } else if row.attempts > 0 {
        State::Stuck
    } else {
        State::Live
    };
    Ok(Status {
        name,
        state,
        position: row.position,
        lag: (head - row.position).max(0),
        documents,
        digest,
        error: (state == State::Stuck).then_some(row.last_error).flatten(),
    })
}

/// May the projection answer a read? Not while it is being rebuilt; otherwise
/// once it has applied the log up to its head as it is now (which holds every
/// write committed before the read, the reader's own included), waiting at
/// most `wait`. A read answered by a read model is then never older than one
/// answered by the command side at the same moment.
pub async fn serving(db: &Database, name: &str, wait: Duration) -> Result<bool, StoreError> {
    let Some(state) = row(db, name).await? else {
        return Ok(false);
    };
    if state.rebuild_to.is_some_and(|to| state.position < to) {
        return Ok(false);
    }
    crate::dispatch::wait_caught_up(db, name, wait).await
}

/// A rebuild that has emptied its projection and holds its consumer's lease:
/// [`Rebuild::run`] delivers the log to it again.
pub struct Rebuild {
    runner: Runner,
}

/// Starts building `projection` again from the whole log (see the module's
/// documentation): takes the consumer's lease, then empties the read model, its
/// inbox and its position in one transaction. From then on [`status`] says
/// `rebuilding` and [`serving`] is false until it has caught up.
pub async fn begin_rebuild(
    db: &Database,
    projection: Arc<dyn Projection>,
    settings: DispatcherSettings,
) -> Result<Rebuild, StoreError> {
    const REGISTER: &str =
        "INSERT INTO event_consumers (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
    const TAKE: &str =
        "UPDATE event_consumers SET lease_owner = $2, lease_until = $3 WHERE name = $1";
    const RESET: &str = "UPDATE event_consumers SET position = 0, attempts = 0, retry_at = NULL, \
                         last_error = NULL, rebuild_to = $2 WHERE name = $1 AND lease_owner = $3";
    const FORGET: &str = "DELETE FROM event_inbox WHERE consumer = $1";
    let name = projection.name();
    let owner = format!("rebuild-{}-{}", std::process::id(), Uuid::now_v7().simple());
    with_pool!(db, pool => { sqlx::query(REGISTER).bind(name).execute(pool).await?; });
    // Take the lease first, in its own transaction: a batch in flight elsewhere
    // then fails its fenced move and rolls back, releasing the rows it touched
    // (the read model's rows are deleted before the consumer's row is locked, so
    // the two never wait for each other).
    with_pool!(db, pool => {
        sqlx::query(TAKE).bind(name).bind(&owner).bind(after(settings.lease)).execute(pool).await?;
    });
    let head = EventLog::new(db.clone()).head().await?;
    let mut tx = db.begin().await?;
    projection.clear(&mut tx).await?;
    with_tx!(&mut tx, conn => {
        sqlx::query(FORGET).bind(name).execute(&mut *conn).await?;
    });
    let reset = with_tx!(&mut tx, conn => {
        sqlx::query(RESET).bind(name).bind(head).bind(&owner).execute(conn).await?.rows_affected()
    });
    if reset != 1 {
        tx.rollback().await?;
        return Err(StoreError::Other(format!(
            "projection {name}: another rebuild took the lease"
        )));
    }
    tx.commit().await?;
    tracing::info!(
        projection = name,
        to = head,
        "projection emptied; rebuilding from the log"
    );
    let consumer: Arc<dyn Consumer> = projection;
    Ok(Rebuild {
        runner: Runner {
            db: db.clone(),
            consumer,
            settings,
            owner,
            heartbeat: scaleshop_telemetry::Heartbeat::default(),
            leased_at: None,
        },
    })
}

impl Rebuild {
    /// Delivers the log to the projection until it has caught up with the head,
    /// then hands the lease back. On an error (an event that fails, a lease
    /// taken over) the consumer's usual runner finishes the rebuild.
    pub async fn run(mut self) -> Result<(), StoreError> {
        let name = self.runner.name();
        let outcome = loop {
            match self.runner.step().await {
                Ok(Step::Progress) => {}
                Ok(Step::Drained | Step::Idle) => break Ok(()),
                Ok(Step::RetryAt(_)) => {
                    break Err(StoreError::Other(format!(
                        "projection {name}: an event failed during the rebuild; it is retried"
                    )));
                }
                Ok(Step::NotLeader) => {
                    break Err(StoreError::Other(format!(
                        "projection {name}: another rebuild took it over"
                    )));
                }
                Err(e) => break Err(e),
            }
        };
        self.runner.release_lease().await;
        if outcome.is_ok() {
            tracing::info!(projection = name, "projection rebuilt");
        }
        outcome
    }
}
