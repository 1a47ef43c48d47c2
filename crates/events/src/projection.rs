//! Read models kept in tables (CQRS projections): a [`Projection`] is a
//! [`Consumer`] whose effects are tables of its own, built only from events.
//! This module gives every such projection what the search index has on disk:
//! a state (`live`, `rebuilding`, `stuck`), a digest of its rows, a bounded wait
//! for read-your-writes, and a rebuild from the whole log while it serves.
//!
//! A rebuild builds a second copy of the read model's tables (each [`Table`]'s
//! `shadow`, such as `order_history_next`, made as the migrations make the live
//! one) by delivering the whole log to a second instance of the projection
//! ([`Projection::shadow`]) that writes into it, under a consumer name of its
//! own (`order-history.rebuild`: its own position, inbox, dead events and
//! lease), through the same delivery code as the dispatcher. The live copy
//! keeps following the log and answering reads meanwhile; the new copy follows
//! the live copy's position, never past it. Once it has reached it, the
//! rebuilder takes the live consumer's lease (a batch in flight then fails its
//! fenced position move and rolls back, so the live position stands still),
//! delivers to the new copy what is left up to that position, and swaps in one
//! transaction: the live tables are dropped and the new ones renamed in their
//! place (indexes included), the consumer's inbox and dead events become the
//! new copy's, and the shadow consumer goes. The position stays where it was:
//! the served position never moves back, and each copy applied each event
//! once. The live consumer's runner then goes on from there, on the new rows.
//!
//! A rebuild asked while one runs is that one. A rebuilder that dies leaves the
//! live copy as it was and its new copy at the position it reached: every
//! process that delivers the projection looks for such an abandoned rebuild at
//! start and every lease period and finishes it, as does the next request for a
//! rebuild.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scaleshop_db::clock::{after, now};
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Backend, Database, StoreError, Topic, Tx, with_pool, with_tx};
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use crate::EventLog;
use crate::dispatch::{Consumer, DispatcherSettings, Runner, Step};

/// The end of the consumer name of a rebuild's new copy: `<name>.rebuild`.
pub const REBUILD_SUFFIX: &str = ".rebuild";

/// Is `consumer` the new copy of a rebuild (not a consumer of the log's own)?
pub fn is_rebuild(consumer: &str) -> bool {
    consumer.ends_with(REBUILD_SUFFIX)
}

/// A table of a read model, as a rebuild makes its new copy and swaps it in.
#[derive(Debug)]
pub struct Table {
    /// The name the service reads (the migrations make it).
    pub name: &'static str,
    /// The name of the copy a rebuild fills.
    pub shadow: &'static str,
    /// `CREATE TABLE {table} (...)` on SQLite and on PostgreSQL, as the
    /// migrations make the live table (`{table}` is the copy's name).
    pub sqlite: &'static str,
    pub postgres: &'static str,
    /// Its secondary indexes, `(suffix, columns)`: made as
    /// `CREATE INDEX {table}_{suffix} ON {table} {columns}`, the migrations'
    /// names.
    pub indexes: &'static [(&'static str, &'static str)],
}

impl Table {
    /// The name of this table in the copy an instance writes.
    pub fn named(&self, shadow: bool) -> &'static str {
        if shadow { self.shadow } else { self.name }
    }

    /// The statements that make the rebuild's copy, empty (after one an
    /// abandoned rebuild left).
    fn create_shadow(&self, backend: Backend) -> Vec<String> {
        let table = self.shadow;
        let create = match backend {
            Backend::Sqlite => self.sqlite,
            Backend::Postgres => self.postgres,
        };
        let mut statements = vec![
            format!("DROP TABLE IF EXISTS {table}"),
            create.replace("{table}", table),
        ];
        for (suffix, columns) in self.indexes {
            statements.push(format!(
                "CREATE INDEX {table}_{suffix} ON {table} {columns}"
            ));
        }
        statements
    }

    /// The statements that put the rebuild's copy in place of the live table,
    /// under its name and its indexes' names. PostgreSQL renames the indexes
    /// (the primary key's is `{table}_pkey`); SQLite renames its primary key's
    /// with the table and cannot rename an index, so it makes the others again
    /// (readers, on the last commit, do not wait for it).
    fn swap(&self, backend: Backend) -> Vec<String> {
        let (live, shadow) = (self.name, self.shadow);
        let mut statements = vec![
            format!("DROP TABLE {live}"),
            format!("ALTER TABLE {shadow} RENAME TO {live}"),
        ];
        match backend {
            Backend::Postgres => {
                statements.push(format!(
                    "ALTER INDEX IF EXISTS {shadow}_pkey RENAME TO {live}_pkey"
                ));
                for (suffix, _) in self.indexes {
                    statements.push(format!(
                        "ALTER INDEX {shadow}_{suffix} RENAME TO {live}_{suffix}"
                    ));
                }
            }
            Backend::Sqlite => {
                for (suffix, columns) in self.indexes {
                    statements.push(format!("DROP INDEX {shadow}_{suffix}"));
                    statements.push(format!("CREATE INDEX {live}_{suffix} ON {live} {columns}"));
                }
            }
        }
        statements
    }
}

/// `sql` with every `{table}` replaced by `table`: one statement for either copy
/// of a read model's table. Only a [`Table`]'s names go in.
pub fn on_table(sql: &str, table: &'static str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql.replace("{table}", table))
}

/// Runs `statements` (DDL, which no statement cache keeps) in `tx`.
async fn execute_all(tx: &mut Tx, statements: Vec<String>) -> Result<(), StoreError> {
    for statement in statements {
        with_tx!(tx, conn => {
            sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                .persistent(false)
                .execute(conn)
                .await?;
        });
    }
    Ok(())
}

/// A read model in tables of its own, built only by this consumer's handler.
///
/// The instance the dispatcher delivers to writes the live tables; its
/// [`shadow`](Projection::shadow) writes the rebuild's copies ([`Table::shadow`])
/// with the same statements (see [`on_table`]).
#[async_trait]
pub trait Projection: Consumer {
    /// Its tables.
    fn tables(&self) -> &'static [Table];
    /// The same projection writing into the rebuild's copy of its tables, as
    /// consumer `<name>.rebuild` ([`REBUILD_SUFFIX`]).
    fn shadow(&self) -> Arc<dyn Projection>;
    /// How many rows it holds (in the copy this instance writes), and a
    /// SHA-256 (hex) of them in key order: two copies with the same digest hold
    /// the same rows.
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
    /// A new copy is being built from the log (see `rebuild`); this one keeps
    /// following the log and answering reads until the new one takes its place.
    Rebuilding,
    /// Following the log; reads with a token wait for it (bounded).
    Live,
    /// An event could not be applied and is being retried; reads go to the
    /// command side meanwhile.
    Stuck,
}

/// How far the new copy of a rebuild has got.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = TableRebuildProgress)]
pub struct Progress {
    /// The last event of the log the new copy has applied.
    pub position: i64,
    /// The head of the log when the rebuild began.
    pub to: i64,
    /// Events of the log the new copy has not applied yet.
    pub lag: i64,
    /// Why the new copy is held up, when it is (an event being retried).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A table projection as `GET /v1/projections` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = TableProjectionStatus)]
pub struct Status {
    pub name: &'static str,
    pub state: State,
    /// The last event of the log applied (by the copy that answers reads).
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
    /// The new copy's progress, while a rebuild runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<Progress>,
}

#[derive(Debug, Default, FromRow)]
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

/// The state, position, lag and digest of `projection`, and the progress of
/// its rebuild.
pub async fn status(db: &Database, projection: &dyn Projection) -> Result<Status, StoreError> {
    let name = projection.name();
    let head = EventLog::new(db.clone()).head().await?;
    let live = row(db, name).await?.unwrap_or_default();
    let rebuild = row(db, projection.shadow().name()).await?;
    let (documents, digest) = projection.digest(db).await?;
    let state = if rebuild.is_some() {
        State::Rebuilding
    } else if live.attempts > 0 {
        State::Stuck
    } else {
        State::Live
    };
    Ok(Status {
        name,
        state,
        position: live.position,
        lag: (head - live.position).max(0),
        documents,
        digest,
        error: (live.attempts > 0).then_some(live.last_error).flatten(),
        rebuild: rebuild.map(|r| Progress {
            position: r.position,
            to: r.rebuild_to.unwrap_or(head),
            lag: (head - r.position).max(0),
            error: (r.attempts > 0).then_some(r.last_error).flatten(),
        }),
    })
}

/// May the projection answer a read? Once it has applied the log up to its
/// head as it is now (which holds every write committed before the read, the
/// reader's own included), waiting at most `wait`; a rebuild changes nothing to
/// that (the live copy serves until the new one, as far as the log, takes its
/// place). A read answered by a read model is then never older than one
/// answered by the command side at the same moment.
pub async fn serving(db: &Database, name: &str, wait: Duration) -> Result<bool, StoreError> {
    if row(db, name).await?.is_none() {
        return Ok(false);
    }
    crate::dispatch::wait_caught_up(db, name, wait).await
}

/// The position of consumer `name`, if `owner` holds its lease (any holder
/// when `owner` is `None`).
async fn position(
    db: &Database,
    name: &str,
    owner: Option<&str>,
) -> Result<Option<i64>, StoreError> {
    const Q: &str = "SELECT position FROM event_consumers \
                     WHERE name = $1 AND ($2 IS NULL OR lease_owner = $2)";
    Ok(with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind(name).bind(owner).fetch_optional(pool).await?
    }))
}

/// Hands consumer `name`'s lease back if `owner` holds it, and wakes its
/// runners.
async fn release(db: &Database, name: &str, owner: &str) {
    const Q: &str = "UPDATE event_consumers SET lease_owner = NULL, lease_until = NULL \
                     WHERE name = $1 AND lease_owner = $2";
    let released = with_pool!(db, pool => {
        sqlx::query(Q).bind(name).bind(owner).execute(pool).await.map(|_| ())
    });
    if let Err(e) = released {
        tracing::debug!(consumer = name, error = %e, "lease not released");
    } else if let Err(e) = db.announce(Topic::Events).await {
        tracing::debug!(consumer = name, error = %e, "lease release not announced");
    }
}

/// Deletes the inbox of a rebuild's new copy once it is gone, a slice at a
/// time (on SQLite each slice holds the one writer's lock briefly). Stops if a
/// new rebuild has begun: its first transaction emptied that inbox already.
///
/// On PostgreSQL a slice and that first transaction's delete
/// ([`FORGET_INBOX_POSTGRES`]) may run at once over the same rows: both lock
/// them in the key's order, so one waits for the other instead of each holding
/// rows the other needs (a deadlock, which aborted a rebuild's request).
async fn forget_inbox(db: &Database, shadow: &str) -> Result<(), StoreError> {
    const SLICE: u64 = 1000;
    const SQLITE: &str = "DELETE FROM event_inbox WHERE consumer = $1 \
                          AND event_id IN (SELECT event_id FROM event_inbox WHERE consumer = $1 LIMIT 1000) \
                          AND NOT EXISTS (SELECT 1 FROM event_consumers WHERE name = $1)";
    const POSTGRES: &str = "DELETE FROM event_inbox WHERE consumer = $1 \
                            AND event_id IN (SELECT event_id FROM event_inbox WHERE consumer = $1 \
                            ORDER BY event_id LIMIT 1000 FOR UPDATE) \
                            AND NOT EXISTS (SELECT 1 FROM event_consumers WHERE name = $1)";
    let q = match db.backend() {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    loop {
        let deleted = with_pool!(db, pool => {
            sqlx::query(q).bind(shadow).execute(pool).await?.rows_affected()
        });
        if deleted < SLICE {
            return Ok(());
        }
    }
}

/// Empties the inbox of a rebuild's new copy as a rebuild starts. On
/// PostgreSQL the rows are locked in the key's order, as [`forget_inbox`]
/// locks them.
const FORGET_INBOX_SQLITE: &str = "DELETE FROM event_inbox WHERE consumer = $1";
const FORGET_INBOX_POSTGRES: &str = "DELETE FROM event_inbox WHERE consumer = $1 \
                                     AND event_id IN (SELECT event_id FROM event_inbox WHERE consumer = $1 \
                                     ORDER BY event_id FOR UPDATE)";

/// A rebuild that holds the lease of its projection's new copy:
/// [`Rebuild::run`] builds it and swaps it in.
pub struct Rebuild {
    live: Arc<dyn Projection>,
    /// Delivers to the new copy, under the rebuild's own owner.
    runner: Runner,
}

/// Starts building `projection` again from the whole log (see the module's
/// documentation), or takes over a rebuild of it that its rebuilder left.
/// `None` when a rebuild of it is running already. From then on [`status`]
/// says `rebuilding` until the new copy has taken the live one's place.
pub async fn begin_rebuild(
    db: &Database,
    projection: Arc<dyn Projection>,
    settings: DispatcherSettings,
) -> Result<Option<Rebuild>, StoreError> {
    take(db, projection, settings, true).await
}

/// Takes over a rebuild of `projection` that its rebuilder left (it died, or
/// its process stopped); `None` when there is none, or it is running.
pub async fn resume_rebuild(
    db: &Database,
    projection: Arc<dyn Projection>,
    settings: DispatcherSettings,
) -> Result<Option<Rebuild>, StoreError> {
    const LEASE: &str = "SELECT lease_until FROM event_consumers WHERE name = $1 \
                         AND (lease_owner IS NULL OR lease_until < $2)";
    // A look first: most of the time there is nothing to take over.
    let abandoned: Option<Option<chrono::DateTime<chrono::Utc>>> = with_pool!(db, pool => {
        sqlx::query_scalar(LEASE).bind(projection.shadow().name()).bind(now()).fetch_optional(pool).await?
    });
    if abandoned.is_none() {
        return Ok(None);
    }
    take(db, projection, settings, false).await
}

async fn take(
    db: &Database,
    projection: Arc<dyn Projection>,
    settings: DispatcherSettings,
    start: bool,
) -> Result<Option<Rebuild>, StoreError> {
    const REGISTER: &str =
        "INSERT INTO event_consumers (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
    const RESUME: &str = "UPDATE event_consumers SET lease_owner = $2, lease_until = $3 \
                          WHERE name = $1 AND (lease_owner IS NULL OR lease_until < $4)";
    const START: &str = "INSERT INTO event_consumers (name, lease_owner, lease_until, rebuild_to) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING";
    const FORGET_DEAD: &str = "DELETE FROM event_dead WHERE consumer = $1";
    let name = projection.name();
    let shadow = projection.shadow();
    let shadow_name = shadow.name();
    if shadow_name.strip_suffix(REBUILD_SUFFIX) != Some(name) {
        return Err(StoreError::Other(format!(
            "projection {name}: its new copy is named {shadow_name}, not {name}{REBUILD_SUFFIX}"
        )));
    }
    let owner = format!("rebuild-{}-{}", std::process::id(), Uuid::now_v7().simple());
    // The live consumer's row, which the swap moves, exists even before the
    // dispatcher of some process registered it.
    with_pool!(db, pool => { sqlx::query(REGISTER).bind(name).execute(pool).await?; });
    let head = EventLog::new(db.clone()).head().await?;
    let until = after(settings.lease);
    let mut tx = db.begin().await?;
    let resumed = with_tx!(&mut tx, conn => {
        sqlx::query(RESUME).bind(shadow_name).bind(&owner).bind(until).bind(now())
            .execute(conn).await?.rows_affected()
    }) == 1;
    let started = !resumed
        && start
        && with_tx!(&mut tx, conn => {
            sqlx::query(START).bind(shadow_name).bind(&owner).bind(until).bind(head)
                .execute(conn).await?.rows_affected()
        }) == 1;
    if !resumed && !started {
        tx.rollback().await?;
        return Ok(None);
    }
    if started {
        // What an earlier rebuild may have left: its inbox (a swap whose
        // clean-up was cut off, or still running), its dead events, its tables.
        let backend = tx.backend();
        with_tx!(&mut tx, conn => {
            let forget_inbox = match backend {
                Backend::Sqlite => FORGET_INBOX_SQLITE,
                Backend::Postgres => FORGET_INBOX_POSTGRES,
            };
            sqlx::query(forget_inbox).bind(shadow_name).execute(&mut *conn).await?;
            sqlx::query(FORGET_DEAD).bind(shadow_name).execute(conn).await?;
        });
        for table in projection.tables() {
            execute_all(&mut tx, table.create_shadow(backend)).await?;
        }
    }
    tx.commit().await?;
    if started {
        tracing::info!(
            projection = name,
            to = head,
            "rebuilding a new copy from the log"
        );
    } else {
        tracing::info!(
            projection = name,
            "taking over a rebuild its rebuilder left"
        );
    }
    let consumer: Arc<dyn Consumer> = shadow;
    Ok(Some(Rebuild {
        live: projection,
        runner: Runner {
            db: db.clone(),
            log: db.clone(),
            key: consumer.name(),
            consumer,
            settings,
            owner,
            heartbeat: scaleshop_telemetry::Heartbeat::default(),
            leased_at: None,
            until: None,
        },
    }))
}

/// How many times one run tries to swap before it leaves the rebuild to be
/// taken over (by the finisher of some process, a lease period later).
const SWAP_TRIES: u32 = 5;

/// How many steps (of up to a batch of events each) the new copy may take to
/// reach the live position while the live consumer waits for its lease.
const FINAL_STEPS: u32 = 20;

impl Rebuild {
    /// Builds the new copy until it has caught up with the live one, then
    /// swaps it in (see the module's documentation), and hands the leases back.
    /// On an error the rebuild stays as it is, and is taken over later.
    pub async fn run(mut self) -> Result<(), StoreError> {
        let name = self.live.name();
        let outcome = self.build().await;
        self.runner.release_lease().await;
        match &outcome {
            Ok(()) => tracing::info!(projection = name, "projection rebuilt and swapped in"),
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "projection rebuild stopped; it is taken over later")
            }
        }
        outcome
    }

    async fn build(&mut self) -> Result<(), StoreError> {
        for _ in 0..SWAP_TRIES {
            self.catch_up().await?;
            if self.swap().await? {
                return Ok(());
            }
        }
        Err(StoreError::Other(format!(
            "projection {}: the new copy did not reach the live one {SWAP_TRIES} times",
            self.live.name()
        )))
    }

    /// Delivers the log to the new copy until it has reached the live copy's
    /// position (read before each step).
    async fn catch_up(&mut self) -> Result<(), StoreError> {
        let name = self.live.name();
        loop {
            let live = position(&self.runner.db, name, None).await?.unwrap_or(0);
            self.runner.until = Some(live);
            match self.runner.step().await? {
                Step::Progress => {}
                Step::Drained | Step::Idle => return self.reached(live).await,
                Step::RetryAt(at) => {
                    // Keep the lease while waiting: a step renews it.
                    let wait = (at - now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait.min(self.runner.settings.renew)).await;
                }
                Step::NotLeader => {
                    return Err(StoreError::Other(format!(
                        "projection {name}: another rebuilder took the rebuild over"
                    )));
                }
            }
        }
    }

    /// After a step that drained the log up to `until = live`: the new copy has
    /// taken every event up to `live`, and says so (its position is the last
    /// event it took, which is `live` but for a gap in the sequence).
    async fn reached(&self, live: i64) -> Result<(), StoreError> {
        if self.runner.state().await?.position < live {
            self.runner.advance(live).await?;
        }
        Ok(())
    }

    /// Takes the live consumer's lease, brings the new copy to its position and
    /// swaps. False when it could not (the lease lost, an event failing): the
    /// lease is handed back, and the live copy goes on.
    async fn swap(&mut self) -> Result<bool, StoreError> {
        const TAKE: &str =
            "UPDATE event_consumers SET lease_owner = $2, lease_until = $3 WHERE name = $1";
        let (db, name, owner) = (
            self.runner.db.clone(),
            self.live.name(),
            self.runner.owner.clone(),
        );
        // In a transaction of its own: a live batch in flight then fails its
        // fenced move and rolls back, and no other can commit.
        with_pool!(db, pool => {
            sqlx::query(TAKE).bind(name).bind(&owner).bind(after(self.runner.settings.lease))
                .execute(pool).await?;
        });
        let swapped = self.swap_holding_lease().await;
        if !matches!(swapped, Ok(true)) {
            release(&db, name, &owner).await;
        }
        swapped
    }

    async fn swap_holding_lease(&mut self) -> Result<bool, StoreError> {
        // Where the old copy is, and the new one is, with `$1` the live consumer
        // and `$2` the new copy's.
        const DROP_PARKED: &str = "DELETE FROM event_inbox WHERE consumer = $1 \
                                   AND event_id IN (SELECT event_id FROM event_dead WHERE consumer = $2)";
        const ADD_APPLIED: &str = "INSERT INTO event_inbox (consumer, event_id, processed_at) \
                                   SELECT $1, event_id, processed_at FROM event_inbox WHERE consumer = $2 \
                                   AND event_id IN (SELECT event_id FROM event_dead WHERE consumer = $1) \
                                   ON CONFLICT (consumer, event_id) DO NOTHING";
        const FORGET_DEAD: &str = "DELETE FROM event_dead WHERE consumer = $1";
        const MOVE_DEAD: &str = "UPDATE event_dead SET consumer = $1 WHERE consumer = $2";
        const LIVE: &str = "UPDATE event_consumers SET attempts = 0, retry_at = NULL, last_error = NULL, \
                            rebuild_to = NULL, lease_owner = NULL, lease_until = NULL \
                            WHERE name = $1 AND lease_owner = $2 AND position = $3";
        const GONE: &str =
            "DELETE FROM event_consumers WHERE name = $1 AND lease_owner = $2 AND position = $3";
        let db = self.runner.db.clone();
        let (name, shadow) = (self.live.name(), self.runner.name());
        let owner = self.runner.owner.clone();
        let Some(live) = position(&db, name, Some(&owner)).await? else {
            return Ok(false);
        };
        // The live position stands still now: deliver the rest to the new copy.
        self.runner.until = Some(live);
        let mut reached = false;
        for _ in 0..FINAL_STEPS {
            match self.runner.step().await? {
                Step::Progress => {}
                Step::Drained | Step::Idle => {
                    self.reached(live).await?;
                    reached = true;
                    break;
                }
                Step::RetryAt(_) | Step::NotLeader => break,
            }
        }
        if !reached {
            return Ok(false);
        }
        let mut tx = db.begin().await?;
        // Both copies have applied the log up to `live`: each event was applied
        // or parked by each. The inbox becomes the new copy's, as a difference:
        // what it parked, the old one may have applied; what the old one parked,
        // it may have applied. (Before the tables: a statement that waits for
        // a batch in flight then holds no lock that batch needs.)
        with_tx!(&mut tx, conn => {
            sqlx::query(DROP_PARKED).bind(name).bind(shadow).execute(&mut *conn).await?;
            sqlx::query(ADD_APPLIED).bind(name).bind(shadow).execute(conn).await?;
        });
        let backend = tx.backend();
        for table in self.live.tables() {
            execute_all(&mut tx, table.swap(backend)).await?;
        }
        let (updated, deleted) = with_tx!(&mut tx, conn => {
            sqlx::query(FORGET_DEAD).bind(name).execute(&mut *conn).await?;
            sqlx::query(MOVE_DEAD).bind(name).bind(shadow).execute(&mut *conn).await?;
            let updated = sqlx::query(LIVE).bind(name).bind(&owner).bind(live)
                .execute(&mut *conn).await?.rows_affected();
            let deleted = sqlx::query(GONE).bind(shadow).bind(&owner).bind(live)
                .execute(conn).await?.rows_affected();
            (updated, deleted)
        });
        if (updated, deleted) != (1, 1) {
            tx.rollback().await?;
            return Ok(false);
        }
        // The live consumer's runners (here and elsewhere) take it back at once.
        tx.wake_everywhere_on_commit(Topic::Events).await?;
        tx.commit().await?;
        tracing::info!(
            projection = name,
            position = live,
            "the new copy took the live one's place"
        );
        if let Err(e) = forget_inbox(&db, shadow).await {
            tracing::warn!(projection = name, error = %e, "the new copy's inbox is left; the next rebuild deletes it");
        }
        Ok(true)
    }
}

/// Finishes, in this process, the rebuilds of `projections` that their
/// rebuilders left (they died, or their process stopped): looks at start and
/// every lease period, until `shutdown`.
pub(crate) async fn finish_abandoned_rebuilds(
    db: Database,
    projections: Vec<Arc<dyn Projection>>,
    settings: DispatcherSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = settings.lease;
    while !*shutdown.borrow() {
        for projection in &projections {
            match resume_rebuild(&db, projection.clone(), settings.clone()).await {
                Ok(Some(rebuild)) => {
                    tokio::select! {
                        // `run` logs how it ended.
                        _ = rebuild.run() => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    projection = projection.name(),
                    error = %e,
                    "could not look for an abandoned rebuild"
                ),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => {}
        }
    }
}
