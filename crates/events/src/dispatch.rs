//! The dispatcher: delivers the log to each subscribed consumer in sequence order.
//!
//! Per consumer it keeps a position, and for the event at the head an attempt
//! count and a retry time (`event_consumers`). Events are delivered in batches: one
//! transaction takes up to 60 events (or 20 ms of them) and, for each, inserts
//! `(consumer, event id)` into the inbox (a duplicate skips the handler) and runs the
//! handler with the same transaction inside a savepoint of its own; then it moves
//! the position once — fenced by the lease, so a process that lost the consumer can
//! never commit — and commits once. A failing handler's savepoint is rolled back, the
//! events before it commit, and its failure counts as one attempt, exactly as if it
//! had been delivered alone. A failing
//! handler is retried with exponential backoff and jitter; after `max_attempts` the
//! event is parked in `event_dead` for that consumer and delivery goes on. An admin
//! can ask for a dead event to be redelivered.
//!
//! Several processes may share the log (PostgreSQL): each consumer is served by one
//! process at a time under a short lease that a heartbeat renews, taken over when
//! the lease expires (a few seconds after its holder died). A process that knows it
//! is alone (the embedded data folder's lock) frees every lease at start
//! ([`release_all_leases`]). Dispatchers
//! wake on commit: in-process through [`Database::commit_signal`], across processes
//! through PostgreSQL's `LISTEN` ([`Database::spawn_commit_listener`]), with a short
//! poll as the safety net.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_db::clock::{after, backoff, now};
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Database, StoreError, Topic, Tx, with_pool, with_tx};
use scaleshop_telemetry::{Collector, Heartbeat, names};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::projection::Projection;
use crate::{Event, EventLog};

/// Why a handler failed; the message is kept as the event's `last_error`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    message: String,
    permanent: bool,
}

impl HandlerError {
    /// A failure that may pass: the event is retried with backoff, and parked as
    /// dead after the last attempt.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }

    /// A failure that no retry can cure (the event cannot be read by this build):
    /// the event is parked as dead for the consumer at once, and delivery goes on.
    /// An admin redelivers it once a consumer that can handle it runs. A read
    /// model ([`Consumer::is_projection`]) retries it like any failure instead:
    /// it must not skip an event silently, so it stays behind (`stuck`, its
    /// reads answered by the command side) until its last attempt.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        Self::new(error.to_string())
    }
}

/// An event this consumer cannot read (another version, a bad payload) reads the
/// same on every retry: it is parked at once.
impl From<scaleshop_contracts::DecodeError> for HandlerError {
    fn from(error: scaleshop_contracts::DecodeError) -> Self {
        Self::permanent(error.to_string())
    }
}

/// A subscriber to the log. Its effects must be written through `tx`, the
/// transaction that also records the delivery, so they happen exactly once.
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Stable name: the key of its position, inbox and dead events.
    fn name(&self) -> &'static str;
    /// Does it react to events of this type? Others are passed over.
    fn wants(&self, event_type: &str) -> bool;
    /// A read model (CQRS): its lag is also reported as
    /// `projection_lag{projection = name}`, and an event it cannot read is
    /// retried rather than parked at once (see [`HandlerError::permanent`]).
    fn is_projection(&self) -> bool {
        false
    }
    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError>;
}

#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    /// Attempts before an event is parked as dead for a consumer.
    pub max_attempts: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a process holds a consumer without renewing.
    pub lease: Duration,
    /// How often the heartbeat renews this process's consumer leases (well inside
    /// `lease`).
    pub renew: Duration,
    /// Safety-net poll when no commit signal arrives.
    pub poll: Duration,
    pub batch: i64,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            lease: Duration::from_secs(4),
            renew: Duration::from_secs(1),
            poll: Duration::from_millis(500),
            batch: 100,
        }
    }
}

/// An event parked for a consumer.
#[derive(Debug, Clone, Serialize, FromRow, utoipa::ToSchema)]
pub struct DeadEvent {
    pub consumer: String,
    pub event_id: Uuid,
    pub sequence: i64,
    pub attempts: i32,
    pub last_error: String,
    /// `dead`, `redeliver` (asked for) or `redelivered`.
    pub state: String,
    pub died_at: DateTime<Utc>,
}

/// Admin operations on dead events.
#[derive(Debug, Clone)]
pub struct DeadEvents {
    db: Database,
}

impl DeadEvents {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Dead events, optionally of one consumer, ordered by (sequence, consumer).
    pub async fn list(
        &self,
        consumer: Option<&str>,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<DeadEvent>, StoreError> {
        const Q: &str = "SELECT consumer, event_id, sequence, attempts, last_error, state, died_at \
                         FROM event_dead WHERE ($1 IS NULL OR consumer = $1) \
                         AND ($2 IS NULL OR sequence > $2 OR (sequence = $2 AND consumer > $3)) \
                         ORDER BY sequence, consumer LIMIT $4";
        let (after_seq, after_consumer) = after.map_or((None, None), |(s, c)| (Some(s), Some(c)));
        Ok(with_pool!(self.db, pool => {
            sqlx::query_as(Q).bind(consumer).bind(after_seq).bind(after_consumer).bind(limit)
                .fetch_all(pool).await?
        }))
    }

    /// Asks for one more delivery of a dead event. `Ok(false)` when there is no such
    /// dead event (or it is already being redelivered).
    pub async fn redeliver(&self, consumer: &str, event_id: Uuid) -> Result<bool, StoreError> {
        const Q: &str = "UPDATE event_dead SET state = 'redeliver' \
                         WHERE consumer = $1 AND event_id = $2 AND state = 'dead'";
        let mut tx = self.db.begin().await?;
        tx.wake_everywhere_on_commit(Topic::Events).await?;
        let done = with_tx!(&mut tx, conn => {
            sqlx::query(Q).bind(consumer).bind(event_id).execute(conn).await?.rows_affected()
        });
        tx.commit().await?;
        Ok(done == 1)
    }

    pub async fn get(
        &self,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<Option<DeadEvent>, StoreError> {
        const Q: &str = "SELECT consumer, event_id, sequence, attempts, last_error, state, died_at \
                         FROM event_dead WHERE consumer = $1 AND event_id = $2";
        Ok(with_pool!(self.db, pool => {
            sqlx::query_as(Q).bind(consumer).bind(event_id).fetch_optional(pool).await?
        }))
    }
}

/// Delivers the log to consumers. Build it, subscribe consumers, then [`start`].
///
/// [`start`]: Dispatcher::start
pub struct Dispatcher {
    db: Database,
    consumers: Vec<Arc<dyn Consumer>>,
    /// Consumers of other logs (a shard's), whose state lives in `db`.
    followed: Vec<Followed>,
    /// The read models among `consumers`, whose abandoned rebuilds this
    /// process finishes.
    projections: Vec<Arc<dyn Projection>>,
    settings: DispatcherSettings,
    owner: String,
    heartbeat: Heartbeat,
    nats: Option<crate::nats::NatsSettings>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field(
                "consumers",
                &self.consumers.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(crate) enum Step {
    /// Delivered (or passed) events, and there may be more after them.
    Progress,
    /// Delivered every event up to the head the step read: nothing more until
    /// the next commit.
    Drained,
    Idle,
    RetryAt(DateTime<Utc>),
    NotLeader,
}

/// The most events one delivery transaction takes. Each has a savepoint, and
/// PostgreSQL keeps up to 64 subtransactions per transaction in shared memory;
/// past that, every snapshot taken in the server while the transaction runs gets
/// slower (no handler opens savepoints of its own). 60 rather than 32: 0.80 to
/// 0.89 of the raw insert rate on PostgreSQL instead of 0.77 to 0.83
/// (docs/benchmarks.md, "Batched deliveries").
const BATCH_MAX: usize = 60;

/// How long a delivery transaction keeps taking events before it commits: on
/// SQLite it holds the one writer lock, which the API's writes wait for.
const BATCH_TIME: Duration = Duration::from_millis(20);

pub(crate) enum Delivery {
    Done,
    /// Failed its last attempt (or for good): parked in `event_dead` for this
    /// consumer, and the position moved past it.
    Parked {
        attempts: i32,
        error: String,
    },
    Retry(DateTime<Utc>),
    LostLease,
}

#[derive(Debug, FromRow)]
pub(crate) struct ConsumerState {
    pub(crate) position: i64,
    pub(crate) attempts: i32,
    retry_at: Option<DateTime<Utc>>,
}

impl Dispatcher {
    pub fn new(db: Database, settings: DispatcherSettings) -> Self {
        Self {
            db,
            consumers: Vec::new(),
            followed: Vec::new(),
            projections: Vec::new(),
            settings,
            owner: format!("{}-{}", std::process::id(), Uuid::now_v7().simple()),
            heartbeat: Heartbeat::default(),
            nats: None,
        }
    }

    /// Carries the log between processes over NATS JetStream instead of each
    /// process reading the table: a relay publishes the outbox to the stream, and
    /// each consumer is a durable pull consumer (see [`crate::nats`]).
    pub fn with_nats(mut self, settings: crate::nats::NatsSettings) -> Self {
        self.nats = Some(settings);
        self
    }

    pub fn subscribe(&mut self, consumer: Arc<dyn Consumer>) {
        self.consumers.push(consumer);
    }

    /// Subscribes `consumer` to another database's log (a shard's, named
    /// `source`): it reads that log, and keeps its position, inbox, lease and
    /// dead events here, under the name `<consumer>@<source>`, and its handler
    /// writes its effects in this database's transaction, as for the log here.
    /// Events of each log stay in their order; the logs are not ordered against
    /// each other (each is the order of its own aggregates). Only with the
    /// in-database transport.
    pub fn follow(&mut self, source: &str, log: Database, consumer: Arc<dyn Consumer>) {
        // Named once per process start, for the life of the process.
        let key: &'static str = Box::leak(format!("{}@{source}", consumer.name()).into_boxed_str());
        self.followed.push(Followed { key, log, consumer });
    }

    /// Subscribes a read model kept in tables; this process also finishes a
    /// rebuild of it that its rebuilder left (see [`crate::projection`]).
    pub fn subscribe_projection(&mut self, projection: Arc<dyn Projection>) {
        self.consumers.push(projection.clone());
        self.projections.push(projection);
    }

    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Gauges `outbox_backlog` and `event_consumer_lag{consumer}`, computed when
    /// scraped; over NATS also `relay_backlog`, and the lag from each durable
    /// consumer's info.
    pub fn collector(&self) -> Collector {
        let db = self.db.clone();
        let nats = self.nats.clone();
        let consumers: Vec<&'static str> = self.consumers.iter().map(|c| c.name()).collect();
        let followed: Arc<[(&'static str, Database)]> = self
            .followed
            .iter()
            .map(|f| (f.key, f.log.clone()))
            .collect();
        let projections: Arc<[&'static str]> = self
            .consumers
            .iter()
            .filter(|c| c.is_projection())
            .map(|c| c.name())
            .collect();
        Arc::new(move || {
            let db = db.clone();
            let nats = nats.clone();
            let consumers = consumers.clone();
            let projections = projections.clone();
            let followed = followed.clone();
            Box::pin(async move {
                if let Err(e) = report_lag(&db, nats.is_none(), &projections, &followed).await {
                    tracing::warn!(error = %e, "event lag metrics unavailable");
                }
                if let Some(nats) = nats {
                    crate::nats::report(&db, &nats, &consumers).await;
                }
            })
        })
    }

    /// Registers the consumers and starts one loop per consumer. (The wake-up from
    /// other processes on PostgreSQL is `Database::spawn_commit_listener`, started
    /// by the composition root.) The handle ends when every loop has stopped after
    /// `shutdown` turned true.
    pub async fn start(
        self,
        shutdown: watch::Receiver<bool>,
    ) -> Result<JoinHandle<()>, StoreError> {
        const REGISTER: &str =
            "INSERT INTO event_consumers (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
        let names = self.consumers.iter().map(|c| c.name());
        for name in names.chain(self.followed.iter().map(|f| f.key)) {
            with_pool!(self.db, pool => {
                sqlx::query(REGISTER).bind(name).execute(pool).await?;
            });
        }
        if self.nats.is_some() && !self.followed.is_empty() {
            return Err(StoreError::Other(
                "the logs of other databases are followed only by the in-database transport".into(),
            ));
        }
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(heartbeat(
            self.db.clone(),
            self.owner.clone(),
            self.settings.clone(),
            self.heartbeat.clone(),
            shutdown.clone(),
        )));
        for followed in self.followed {
            let runner = Runner {
                db: self.db.clone(),
                log: followed.log,
                key: followed.key,
                consumer: followed.consumer,
                settings: self.settings.clone(),
                owner: self.owner.clone(),
                heartbeat: self.heartbeat.clone(),
                leased_at: None,
                until: None,
            };
            tasks.push(tokio::spawn(runner.run(shutdown.clone())));
        }
        let runners = self.consumers.into_iter().map(|consumer| Runner {
            db: self.db.clone(),
            log: self.db.clone(),
            key: consumer.name(),
            consumer,
            settings: self.settings.clone(),
            owner: self.owner.clone(),
            heartbeat: self.heartbeat.clone(),
            leased_at: None,
            until: None,
        });
        match &self.nats {
            None => {
                for runner in runners {
                    tasks.push(tokio::spawn(runner.run(shutdown.clone())));
                }
            }
            Some(nats) => {
                let started = crate::nats::start(
                    &self.db,
                    nats,
                    &self.owner,
                    &self.settings,
                    runners.collect(),
                    &shutdown,
                )
                .await?;
                tasks.extend(started);
            }
        }
        if !self.projections.is_empty() {
            tasks.push(tokio::spawn(crate::projection::finish_abandoned_rebuilds(
                self.db.clone(),
                self.projections,
                self.settings.clone(),
                shutdown.clone(),
            )));
        }
        self.heartbeat.beat();
        Ok(tokio::spawn(async move {
            for task in tasks {
                let _ = task.await;
            }
        }))
    }
}

/// Renews every consumer lease this process holds, every `renew`, until shutdown:
/// a live process keeps its consumers even while one delivery takes long, and a
/// dead one's leases run out `lease` after its last beat. Each renewal that
/// reached the database is a beat of the dispatcher's liveness too: a process
/// with no consumers of its own (one that only writes to the log) is live as long
/// as this loop turns.
async fn heartbeat(
    db: Database,
    owner: String,
    settings: DispatcherSettings,
    alive: Heartbeat,
    mut shutdown: watch::Receiver<bool>,
) {
    const Q: &str = "UPDATE event_consumers SET lease_until = $2 WHERE lease_owner = $1";
    let every = settings.renew.min(settings.lease / 2);
    while !*shutdown.borrow() {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let renewed = with_pool!(db, pool => {
            sqlx::query(Q).bind(&owner).bind(after(settings.lease)).execute(pool).await.map(|r| r.rows_affected())
        });
        match renewed {
            Ok(_) => alive.beat(),
            Err(e) => tracing::warn!(error = %e, "consumer lease renewal failed"),
        }
    }
}

/// Frees every consumer lease at once. Only for a process that knows no other
/// process serves the log (the embedded data folder's lock): the holders are dead,
/// so waiting for their leases to run out would only delay delivery. Returns how
/// many leases were held.
pub async fn release_all_leases(db: &Database) -> Result<u64, StoreError> {
    const Q: &str = "UPDATE event_consumers SET lease_owner = NULL, lease_until = NULL \
                     WHERE lease_owner IS NOT NULL";
    let mut tx = db.begin().await?;
    tx.wake_on_commit(Topic::Events);
    let released = with_tx!(&mut tx, conn => {
        sqlx::query(Q).execute(conn).await?.rows_affected()
    });
    tx.commit().await?;
    Ok(released)
}

/// `outbox_backlog`; `event_consumer_lag` per consumer (unless NATS reports it);
/// `projection_lag` for the consumers that are read models, from their
/// positions in the database (kept there on either transport).
async fn report_lag(
    db: &Database,
    per_consumer: bool,
    projections: &[&'static str],
    followed: &[(&'static str, Database)],
) -> Result<(), StoreError> {
    const POSITIONS: &str = "SELECT name, position FROM event_consumers";
    const BEHIND: &str = "SELECT COUNT(*) FROM events WHERE sequence > $1";
    let positions: Vec<(String, i64)> =
        with_pool!(db, pool => sqlx::query_as(POSITIONS).fetch_all(pool).await?);
    let mut slowest: Option<i64> = None;
    for (name, position) in positions {
        // A rebuild's new copy of a read model is no consumer of the log's:
        // `GET /v1/projections` shows its progress.
        if crate::projection::is_rebuild(&name) || is_followed(&name) {
            continue;
        }
        slowest = Some(slowest.map_or(position, |s| s.min(position)));
        let projection = projections.iter().find(|p| **p == name).copied();
        if !per_consumer && projection.is_none() {
            continue;
        }
        let behind: i64 = with_pool!(db, pool => {
            sqlx::query_scalar(BEHIND).bind(position).fetch_one(pool).await?
        });
        if let Some(projection) = projection {
            metrics::gauge!(names::PROJECTION_LAG, "projection" => projection).set(behind as f64);
        }
        if per_consumer {
            metrics::gauge!(names::EVENT_CONSUMER_LAG, "consumer" => name).set(behind as f64);
        }
    }
    let mut backlog: i64 = match slowest {
        Some(position) => with_pool!(db, pool => {
            sqlx::query_scalar(BEHIND).bind(position).fetch_one(pool).await?
        }),
        None => 0,
    };
    // Another log's consumers: behind that log's head. Its backlog is what its
    // slowest follower here has not handled.
    const POSITION: &str = "SELECT position FROM event_consumers WHERE name = $1";
    let mut slowest_of: Vec<(&Database, i64)> = Vec::new();
    for (key, log) in followed {
        let position: i64 = with_pool!(db, pool => {
            sqlx::query_scalar(POSITION).bind(*key).fetch_optional(pool).await?
        })
        .unwrap_or(0);
        let behind: i64 = with_pool!(log, pool => {
            sqlx::query_scalar(BEHIND).bind(position).fetch_one(pool).await?
        });
        metrics::gauge!(names::EVENT_CONSUMER_LAG, "consumer" => *key).set(behind as f64);
        match slowest_of.iter_mut().find(|(l, _)| l.same_as(log)) {
            Some((_, most)) => *most = (*most).max(behind),
            None => slowest_of.push((log, behind)),
        }
    }
    backlog += slowest_of.iter().map(|(_, behind)| behind).sum::<i64>();
    metrics::gauge!(names::OUTBOX_BACKLOG).set(backlog as f64);
    Ok(())
}

/// A consumer of another database's log ([`Dispatcher::follow`]).
struct Followed {
    key: &'static str,
    log: Database,
    consumer: Arc<dyn Consumer>,
}

/// A consumer row that follows another database's log (`<consumer>@<source>`):
/// its position counts in that log.
pub fn is_followed(name: &str) -> bool {
    name.contains('@')
}

pub(crate) struct Runner {
    /// Where the consumer's state and effects live.
    pub(crate) db: Database,
    /// The log it reads: `db`'s, or another database's ([`Dispatcher::follow`]).
    pub(crate) log: Database,
    /// The consumer's name in `db` (its own, or `<name>@<source>`).
    pub(crate) key: &'static str,
    pub(crate) consumer: Arc<dyn Consumer>,
    pub(crate) settings: DispatcherSettings,
    pub(crate) owner: String,
    pub(crate) heartbeat: Heartbeat,
    /// When this runner last took or confirmed the lease with a write: within
    /// `renew` of it (the heartbeat extends every lease this process holds), a
    /// step only reads the state, still fenced by the owner. A write per step
    /// would be a commit per consumer per event (on SQLite, the one writer's
    /// lock, which the API's writes wait for).
    pub(crate) leased_at: Option<tokio::time::Instant>,
    /// Delivers no event after this sequence (a rebuild's new copy, which
    /// follows the live copy's position rather than the head).
    pub(crate) until: Option<i64>,
}

impl Runner {
    pub(crate) fn name(&self) -> &'static str {
        self.key
    }

    /// Runs the handler; a panic is a failed attempt like any other (retried, then
    /// parked as dead), never the end of this consumer's loop.
    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        use futures::FutureExt;
        match std::panic::AssertUnwindSafe(self.consumer.handle(event, tx))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(consumer = self.name(), event_id = %event.id, "event handler panicked");
                Err(HandlerError::new("the handler panicked"))
            }
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let signal = self.log.commit_signal(Topic::Events);
        while !*shutdown.borrow() {
            let notified = signal.notified();
            tokio::pin!(notified);
            // Register before looking, so a commit in between is not missed.
            notified.as_mut().enable();
            let wait = match self.step().await {
                Ok(Step::Progress) => {
                    self.heartbeat.beat();
                    continue;
                }
                // A commit since `notified` was enabled (another event, or
                // one this consumer's own handlers appended) wakes it at once.
                Ok(Step::Drained | Step::Idle) => self.settings.poll,
                Ok(Step::RetryAt(at)) => (at - now())
                    .to_std()
                    .unwrap_or_default()
                    .min(self.settings.poll),
                Ok(Step::NotLeader) => self.lease_wait().await,
                Err(e) => {
                    tracing::warn!(consumer = self.name(), error = %e, "dispatch step failed");
                    Duration::from_secs(1)
                }
            };
            self.heartbeat.beat();
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        self.release_lease().await;
    }

    /// How long until the lease another process holds on this consumer runs
    /// out, when this one may take over (at most the safety-net poll): a standby
    /// waits for exactly that, not for a timer.
    pub(crate) async fn lease_wait(&self) -> Duration {
        const Q: &str = "SELECT lease_until FROM event_consumers WHERE name = $1";
        let until = async {
            Ok(with_pool!(self.db, pool => {
                sqlx::query_scalar(Q).bind(self.name()).fetch_optional(pool).await?
            }))
        };
        until_lease_ends(until.await, self.settings.poll)
    }

    /// Hands the consumer over at once instead of after the lease runs out.
    pub(crate) async fn release_lease(&self) {
        const RELEASE: &str = "UPDATE event_consumers SET lease_owner = NULL, lease_until = NULL \
                               WHERE name = $1 AND lease_owner = $2";
        let released = with_pool!(self.db, pool => {
            sqlx::query(RELEASE).bind(self.name()).bind(&self.owner).execute(pool).await.map(|r| r.rows_affected())
        });
        if let Err(e) = released {
            tracing::debug!(consumer = self.name(), error = %e, "lease not released");
        } else if let Err(e) = self.db.announce(Topic::Events).await {
            // The standby then takes over when the lease would have ended.
            tracing::debug!(consumer = self.name(), error = %e, "lease release not announced");
        }
    }

    pub(crate) async fn acquire_lease(&self) -> Result<bool, StoreError> {
        Ok(self.take_lease().await?.is_some())
    }

    /// Takes (or keeps) the lease and reads the consumer's state in one
    /// statement; `None` when another process holds the lease.
    async fn take_lease(&self) -> Result<Option<ConsumerState>, StoreError> {
        const Q: &str = "UPDATE event_consumers SET lease_owner = $2, lease_until = $3 \
                         WHERE name = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $4) \
                         RETURNING position, attempts, retry_at";
        Ok(with_pool!(self.db, pool => {
            sqlx::query_as(Q)
                .bind(self.name())
                .bind(&self.owner)
                .bind(after(self.settings.lease))
                .bind(now())
                .fetch_optional(pool)
                .await?
        }))
    }

    pub(crate) async fn state(&self) -> Result<ConsumerState, StoreError> {
        const Q: &str = "SELECT position, attempts, retry_at FROM event_consumers WHERE name = $1";
        Ok(with_pool!(self.db, pool => sqlx::query_as(Q).bind(self.name()).fetch_one(pool).await?))
    }

    /// Takes (or keeps) the lease and reads the consumer's state in one
    /// statement; `None` when another process holds the lease. Within `renew`
    /// of the last time it did, only reads the state, if the lease is still
    /// this runner's: every delivery's position move is fenced by the owner
    /// anyway, so a lease lost meanwhile loses nothing.
    async fn lease_and_state(&mut self) -> Result<Option<ConsumerState>, StoreError> {
        const HELD: &str = "SELECT position, attempts, retry_at FROM event_consumers \
                            WHERE name = $1 AND lease_owner = $2";
        let fresh = self
            .leased_at
            .is_some_and(|at| at.elapsed() < self.settings.renew.min(self.settings.lease / 3));
        let state: Option<ConsumerState> = if fresh {
            with_pool!(self.db, pool => {
                sqlx::query_as(HELD).bind(self.name()).bind(&self.owner).fetch_optional(pool).await?
            })
        } else {
            let at = tokio::time::Instant::now();
            let state = self.take_lease().await?;
            if state.is_some() {
                self.leased_at = Some(at);
            }
            state
        };
        if state.is_none() {
            self.leased_at = None;
        }
        Ok(state)
    }

    pub(crate) async fn step(&mut self) -> Result<Step, StoreError> {
        let Some(state) = self.lease_and_state().await? else {
            return Ok(Step::NotLeader);
        };
        if self.redeliver_one().await? {
            return Ok(Step::Progress);
        }
        if let Some(at) = state.retry_at
            && at > now()
        {
            return Ok(Step::RetryAt(at));
        }
        let mut events = EventLog::new(self.log.clone())
            .list(state.position, self.settings.batch)
            .await?;
        if let Some(until) = self.until {
            events.retain(|e| e.sequence <= until);
        }
        let Some(last) = events.last().map(|e| e.sequence) else {
            return Ok(Step::Idle);
        };
        let wanted: Vec<&Event> = events
            .iter()
            .filter(|e| self.consumer.wants(&e.kind))
            .collect();
        let mut rest = &wanted[..];
        let mut attempts = state.attempts;
        let mut renewed = tokio::time::Instant::now();
        while !rest.is_empty() {
            // A long run of batches must not outlive the lease: renew it as we go.
            if renewed.elapsed() > self.settings.renew.min(self.settings.lease / 3) {
                if !self.acquire_lease().await? {
                    return Ok(Step::NotLeader);
                }
                renewed = tokio::time::Instant::now();
            }
            let (committed, stopped) = self.deliver_batch(rest, attempts).await?;
            rest = &rest[committed..];
            attempts = 0;
            match stopped {
                None => {}
                Some(Delivery::Done | Delivery::Parked { .. }) => rest = &rest[1..],
                Some(Delivery::Retry(at)) => return Ok(Step::RetryAt(at)),
                Some(Delivery::LostLease) => return Ok(Step::NotLeader),
            }
        }
        // Events this consumer does not want after the last one it took: pass them.
        if events.last().is_some_and(|e| !self.consumer.wants(&e.kind)) {
            self.advance(last).await?;
        }
        if i64::try_from(events.len()).is_ok_and(|n| n < self.settings.batch) {
            Ok(Step::Drained)
        } else {
            Ok(Step::Progress)
        }
    }

    /// Delivers the first events of `events` in one transaction: one commit and
    /// one position move for up to [`BATCH_MAX`] events or [`BATCH_TIME`],
    /// whichever ends first. Each event runs in its own savepoint, so a failing
    /// handler's writes are undone alone: the events before it commit, and its
    /// failure is recorded as a failed attempt ([`Runner::failed`]) as if it had
    /// been delivered on its own. `prior_attempts` are the first event's.
    ///
    /// Returns how many events were committed, and the outcome of the event after
    /// them when the batch stopped at a failure (`Retry`, `Parked`) or lost the
    /// lease.
    async fn deliver_batch(
        &self,
        events: &[&Event],
        prior_attempts: i32,
    ) -> Result<(usize, Option<Delivery>), StoreError> {
        const MOVE: &str = "UPDATE event_consumers SET position = $2, attempts = 0, retry_at = NULL, \
                            last_error = NULL WHERE name = $1 AND lease_owner = $3";
        let started = tokio::time::Instant::now();
        let mut tx = self.db.begin().await?;
        let (mut delivered, mut duplicates) = (0_u64, 0_u64);
        let mut last = None;
        let mut failure = None;
        for event in events.iter().take(BATCH_MAX) {
            if last.is_some() && started.elapsed() > BATCH_TIME {
                break;
            }
            // On PostgreSQL an append holds the log's lock until commit: a later
            // handler of the batch that then waited for a row lock could close a
            // cycle with a transaction that holds the row and waits for the log
            // (a deadlock, one side aborted). Commit right after an append.
            if last.is_some()
                && tx.backend() == scaleshop_db::Backend::Postgres
                && tx.wakes(Topic::Events)
            {
                break;
            }
            with_tx!(&mut tx, conn => {
                sqlx::query("SAVEPOINT delivery").execute(conn).await?;
            });
            let span = consume_span(self.name(), event);
            let fresh = self
                .claim_inbox(&mut tx, event)
                .instrument(span.clone())
                .await?;
            let outcome = if fresh {
                self.handle(event, &mut tx).instrument(span).await
            } else {
                Ok(())
            };
            match outcome {
                Ok(()) => {
                    last = Some(event.sequence);
                    if fresh {
                        delivered += 1;
                    } else {
                        duplicates += 1;
                    }
                }
                Err(error) => {
                    failure = Some((*event, error));
                    break;
                }
            }
        }
        // The failing event's earlier attempts: only the first event has any.
        let attempts = if last.is_none() { prior_attempts } else { 0 };
        let mut committed = 0;
        if failure.is_some() {
            let undone = with_tx!(&mut tx, conn => {
                sqlx::query("ROLLBACK TO SAVEPOINT delivery").execute(conn).await.map(|_| ())
            });
            if undone.is_err() {
                // The connection is unusable (a handler may have been cut off
                // mid-query): nothing of the batch commits. Deliver the first
                // event on its own, as a batch of one would be, so a failure is
                // counted against the event it belongs to.
                let _ = tx.rollback().await;
                let outcome = self.deliver(events[0], prior_attempts).await?;
                return Ok((0, Some(outcome)));
            }
        }
        match last {
            Some(position) => {
                let moved = with_tx!(&mut tx, conn => {
                    sqlx::query(MOVE).bind(self.name()).bind(position).bind(&self.owner)
                        .execute(conn).await?.rows_affected()
                });
                if moved != 1 {
                    tx.rollback().await?;
                    return Ok((0, Some(Delivery::LostLease)));
                }
                tx.commit().await?;
                committed = usize::try_from(delivered + duplicates).unwrap_or(usize::MAX);
                for (outcome, count) in [("delivered", delivered), ("duplicate", duplicates)] {
                    if count > 0 {
                        metrics::counter!(names::EVENT_DELIVERIES, "consumer" => self.name(), "outcome" => outcome)
                            .increment(count);
                    }
                }
            }
            None => tx.rollback().await?,
        }
        let Some((event, error)) = failure else {
            return Ok((committed, None));
        };
        let outcome = self.failed(event, attempts + 1, &error).await?;
        Ok((committed, Some(outcome)))
    }

    /// Moves the position past events this consumer does not want.
    pub(crate) async fn advance(&self, to: i64) -> Result<(), StoreError> {
        const Q: &str = "UPDATE event_consumers SET position = $2 \
                         WHERE name = $1 AND lease_owner = $3 AND position < $2";
        let mut tx = self.db.begin().await?;
        with_tx!(&mut tx, conn => {
            sqlx::query(Q).bind(self.name()).bind(to).bind(&self.owner).execute(conn).await?;
        });
        tx.commit().await
    }

    /// Inserts the inbox row; false when this consumer already handled the event.
    async fn claim_inbox(&self, tx: &mut Tx, event: &Event) -> Result<bool, StoreError> {
        const Q: &str = "INSERT INTO event_inbox (consumer, event_id, processed_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (consumer, event_id) DO NOTHING";
        let inserted = with_tx!(tx, conn => {
            sqlx::query(Q).bind(self.name()).bind(event.id).bind(now()).execute(conn).await?.rows_affected()
        });
        Ok(inserted == 1)
    }

    /// Delivers `event` in its consumer's transaction, inside the span of its
    /// consumption (a child of the span that published it).
    pub(crate) async fn deliver(
        &self,
        event: &Event,
        prior_attempts: i32,
    ) -> Result<Delivery, StoreError> {
        self.deliver_traced(event, prior_attempts)
            .instrument(consume_span(self.name(), event))
            .await
    }

    async fn deliver_traced(
        &self,
        event: &Event,
        prior_attempts: i32,
    ) -> Result<Delivery, StoreError> {
        const MOVE: &str = "UPDATE event_consumers SET position = $2, attempts = 0, retry_at = NULL, \
                            last_error = NULL WHERE name = $1 AND lease_owner = $3";
        let mut tx = self.db.begin().await?;
        let fresh = self.claim_inbox(&mut tx, event).await?;
        let outcome = if fresh {
            self.handle(event, &mut tx).await
        } else {
            Ok(())
        };
        match outcome {
            Ok(()) => {
                let moved = with_tx!(&mut tx, conn => {
                    sqlx::query(MOVE).bind(self.name()).bind(event.sequence).bind(&self.owner)
                        .execute(conn).await?.rows_affected()
                });
                if moved != 1 {
                    tx.rollback().await?;
                    return Ok(Delivery::LostLease);
                }
                tx.commit().await?;
                let outcome = if fresh { "delivered" } else { "duplicate" };
                metrics::counter!(names::EVENT_DELIVERIES, "consumer" => self.name(), "outcome" => outcome)
                    .increment(1);
                Ok(Delivery::Done)
            }
            Err(error) => {
                tx.rollback().await?;
                self.failed(event, prior_attempts + 1, &error).await
            }
        }
    }

    async fn failed(
        &self,
        event: &Event,
        attempts: i32,
        error: &HandlerError,
    ) -> Result<Delivery, StoreError> {
        let max = i32::try_from(self.settings.max_attempts).unwrap_or(i32::MAX);
        // A read model does not skip an event it cannot read: it retries it.
        let permanent = error.is_permanent() && !self.consumer.is_projection();
        let error = error.message();
        if permanent || attempts >= max {
            const PARK: &str = "INSERT INTO event_dead (consumer, event_id, sequence, attempts, last_error, state, died_at) \
                                VALUES ($1, $2, $3, $4, $5, 'dead', $6) \
                                ON CONFLICT (consumer, event_id) DO UPDATE SET attempts = excluded.attempts, \
                                last_error = excluded.last_error, state = 'dead', died_at = excluded.died_at";
            const MOVE: &str = "UPDATE event_consumers SET position = $2, attempts = 0, retry_at = NULL, \
                                last_error = NULL WHERE name = $1 AND lease_owner = $3";
            let mut tx = self.db.begin().await?;
            let moved = with_tx!(&mut tx, conn => {
                sqlx::query(PARK).bind(self.name()).bind(event.id).bind(event.sequence).bind(attempts)
                    .bind(error).bind(now()).execute(&mut *conn).await?;
                sqlx::query(MOVE).bind(self.name()).bind(event.sequence).bind(&self.owner)
                    .execute(conn).await?.rows_affected()
            });
            if moved != 1 {
                tx.rollback().await?;
                return Ok(Delivery::LostLease);
            }
            tx.commit().await?;
            metrics::counter!(names::EVENT_DELIVERIES, "consumer" => self.name(), "outcome" => "dead").increment(1);
            tracing::warn!(consumer = self.name(), event_id = %event.id, sequence = event.sequence, attempts, permanent, error, "event parked as dead");
            return Ok(Delivery::Parked {
                attempts,
                error: error.to_owned(),
            });
        }
        let attempt = u32::try_from(attempts).unwrap_or(1);
        let retry_at = after(backoff(
            self.settings.min_backoff,
            self.settings.max_backoff,
            attempt,
        ));
        const RETRY: &str = "UPDATE event_consumers SET attempts = $2, retry_at = $3, last_error = $4 \
                             WHERE name = $1 AND lease_owner = $5";
        let mut tx = self.db.begin().await?;
        let moved = with_tx!(&mut tx, conn => {
            sqlx::query(RETRY).bind(self.name()).bind(attempts).bind(retry_at).bind(error).bind(&self.owner)
                .execute(conn).await?.rows_affected()
        });
        tx.commit().await?;
        if moved != 1 {
            return Ok(Delivery::LostLease);
        }
        metrics::counter!(names::EVENT_DELIVERIES, "consumer" => self.name(), "outcome" => "retried").increment(1);
        tracing::info!(consumer = self.name(), event_id = %event.id, attempts, error, %retry_at, "event delivery failed; will retry");
        Ok(Delivery::Retry(retry_at))
    }

    /// Delivers one event an admin asked to redeliver; true if there was one.
    pub(crate) async fn redeliver_one(&self) -> Result<bool, StoreError> {
        const NEXT: &str = "SELECT event_id FROM event_dead WHERE consumer = $1 AND state = 'redeliver' \
                            ORDER BY sequence LIMIT 1";
        let next: Option<Uuid> = with_pool!(self.db, pool => {
            sqlx::query_scalar(NEXT).bind(self.name()).fetch_optional(pool).await?
        });
        let Some(event_id) = next else {
            return Ok(false);
        };
        let event = EventLog::new(self.log.clone()).get(event_id).await?;
        let span = match &event {
            Some(event) => consume_span(self.name(), event),
            None => tracing::Span::none(),
        };
        self.redeliver_traced(event_id, event)
            .instrument(span)
            .await
    }

    async fn redeliver_traced(
        &self,
        event_id: Uuid,
        event: Option<Event>,
    ) -> Result<bool, StoreError> {
        const DONE: &str =
            "UPDATE event_dead SET state = 'redelivered' WHERE consumer = $1 AND event_id = $2";
        const AGAIN: &str = "UPDATE event_dead SET state = 'dead', attempts = attempts + 1, last_error = $3, \
                             died_at = $4 WHERE consumer = $1 AND event_id = $2";
        let mut tx = self.db.begin().await?;
        let outcome = match &event {
            Some(event) => {
                if self.claim_inbox(&mut tx, event).await? {
                    self.handle(event, &mut tx).await
                } else {
                    Ok(())
                }
            }
            None => Err(HandlerError::new("the event is no longer in the log")),
        };
        match outcome {
            Ok(()) => {
                with_tx!(&mut tx, conn => {
                    sqlx::query(DONE).bind(self.name()).bind(event_id).execute(conn).await?;
                });
                tx.commit().await?;
                metrics::counter!(names::EVENT_DELIVERIES, "consumer" => self.name(), "outcome" => "redelivered")
                    .increment(1);
            }
            Err(error) => {
                tx.rollback().await?;
                let mut tx = self.db.begin().await?;
                with_tx!(&mut tx, conn => {
                    sqlx::query(AGAIN).bind(self.name()).bind(event_id).bind(error.message()).bind(now())
                        .execute(conn).await?;
                });
                tx.commit().await?;
            }
        }
        Ok(true)
    }
}

/// The wait until a lease read from the database (`lease_until`) runs out, plus a
/// little for clocks, at most `cap`; a moment when no one holds it any more, `cap`
/// when there is no such lease, a second when the read failed.
pub(crate) fn until_lease_ends(
    until: Result<Option<Option<DateTime<Utc>>>, StoreError>,
    cap: Duration,
) -> Duration {
    match until {
        Ok(Some(Some(until))) => {
            ((until - now()).to_std().unwrap_or_default() + Duration::from_millis(10)).min(cap)
        }
        // Handed back since the attempt: try again at once.
        Ok(Some(None)) => Duration::from_millis(10).min(cap),
        Ok(None) => cap,
        Err(_) => cap.min(Duration::from_secs(1)),
    }
}

/// The span of one consumer's handling of one event: a child of the span that
/// published it (its `traceparent`), so a saga is one trace across processes.
fn consume_span(consumer: &'static str, event: &Event) -> tracing::Span {
    let span = tracing::info_span!(
        "consume",
        consumer,
        event_type = %event.kind,
        event_id = %event.id,
        trace_id = tracing::field::Empty,
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
    );
    if scaleshop_telemetry::trace::enabled() {
        span.record("otel.kind", "consumer");
        span.record("otel.name", format!("consume {}", event.kind));
        scaleshop_telemetry::trace::adopt(&span, event.traceparent.as_deref());
    }
    span
}

/// Waits (at most `within`) until every consumer in `db` that follows the log
/// of `source` (`<consumer>@<source>`, [`Dispatcher::follow`]) has handled that
/// log up to its head as it is now. True when they have (or there is none).
pub async fn followers_caught_up(
    db: &Database,
    source: &str,
    log: &Database,
    within: Duration,
) -> Result<bool, StoreError> {
    const POSITIONS: &str = "SELECT name, position FROM event_consumers";
    let head = EventLog::new(log.clone()).head().await?;
    let suffix = format!("@{source}");
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let positions: Vec<(String, i64)> =
            with_pool!(db, pool => sqlx::query_as(POSITIONS).fetch_all(pool).await?);
        let behind = positions
            .iter()
            .any(|(name, position)| name.ends_with(&suffix) && *position < head);
        if !behind {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (at most `timeout`) until `consumer` has handled every event committed
/// before this call. For reads that must see the effect of a write made through an
/// event (read-your-writes across an asynchronous boundary). True when caught up.
pub async fn wait_caught_up(
    db: &Database,
    consumer: &str,
    timeout: Duration,
) -> Result<bool, StoreError> {
    const POSITION: &str = "SELECT position FROM event_consumers WHERE name = $1";
    let head = EventLog::new(db.clone()).head().await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let position: Option<i64> = with_pool!(db, pool => {
            sqlx::query_scalar(POSITION).bind(consumer).fetch_optional(pool).await?
        });
        if position.unwrap_or(0) >= head {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
