//! Storage plumbing shared by every service: the connection pool for the configured
//! backend (SQLite in the data folder, or PostgreSQL), the migration runner, the
//! classification of database failures into [`StoreError`], and the pool gauge.
//!
//! This crate knows nothing of users, orders or HTTP. Services own their tables and
//! their migrations; they hand them to [`Database::migrate`].

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

pub use sqlx;

pub mod clock;
pub mod replicas;
pub mod shards;

use replicas::ReplicaSet;
pub use replicas::{Consistency, Reader, ReplicaHealth, ReplicaSettings, WalPosition};

/// PostgreSQL channel notified (at commit) by writes that background loops wait
/// for: event appends and job enqueues. The payload is [`Tx::notice`]'s: the
/// topic, so only that topic's waiters wake, and the sending process's instance,
/// so it does not wake itself twice (it woke its own waiters at commit).
pub const COMMIT_CHANNEL: &str = "scaleshop_commits";

/// What a commit wakes background loops for: the event log's readers (the
/// dispatcher's consumers, the relay, the projections) or the job workers. A
/// commit that enqueues a job does not wake every consumer, nor an event append
/// every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Events,
    Jobs,
    /// The shard map moved (a new epoch): every process reads it again.
    Shards,
}

impl Topic {
    const ALL: [Topic; 3] = [Topic::Events, Topic::Jobs, Topic::Shards];

    fn name(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Jobs => "jobs",
            Self::Shards => "shards",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Events => 1,
            Self::Jobs => 2,
            Self::Shards => 4,
        }
    }
}

/// The commit signals of one [`Database`] (shared by its clones) and the
/// instance name its notifications carry.
#[derive(Debug)]
struct Signals {
    events: Arc<Notify>,
    jobs: Arc<Notify>,
    shards: Arc<Notify>,
    instance: String,
}

impl Signals {
    fn new() -> Self {
        Self {
            events: Arc::new(Notify::new()),
            jobs: Arc::new(Notify::new()),
            shards: Arc::new(Notify::new()),
            instance: uuid::Uuid::now_v7().simple().to_string(),
        }
    }

    fn of(&self, topic: Topic) -> &Arc<Notify> {
        match topic {
            Topic::Events => &self.events,
            Topic::Jobs => &self.jobs,
            Topic::Shards => &self.shards,
        }
    }

    fn notice(&self, topic: Topic) -> String {
        format!("{}:{}", topic.name(), self.instance)
    }

    /// A notification from `COMMIT_CHANNEL`: wakes its topic's waiters unless
    /// this instance sent it; an unknown payload (another version) wakes all.
    fn heard(&self, payload: &str) {
        let (topic, instance) = payload.split_once(':').unwrap_or((payload, ""));
        if instance == self.instance {
            return;
        }
        match Topic::ALL.into_iter().find(|t| t.name() == topic) {
            Some(topic) => self.of(topic).notify_waiters(),
            None => self.wake_all(),
        }
    }

    fn wake_all(&self) {
        for topic in Topic::ALL {
            self.of(topic).notify_waiters();
        }
    }
}

/// Pool settings. The defaults are the seed's: max 20, min 5, idle 30 s, acquire 2 s.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub min_connections: u32,
    pub idle_timeout: Duration,
    pub acquire_timeout: Duration,
    /// Upper bound for one SQL statement (PostgreSQL `statement_timeout`; SQLite's
    /// busy timeout).
    pub statement_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 20,
            min_connections: 5,
            idle_timeout: Duration::from_secs(30),
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Which engine holds the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A pool on the configured backend.
#[derive(Debug, Clone)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The database: the primary's pool, where reads that tolerate staleness go
/// (replicas, or SQLite's read-only pool), and the in-process commit signal.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: Pool,
    /// One connection of its own for [`Database::ping`] (readiness): a pool
    /// busy with work must not read as a database that is down, or a load
    /// burst would take every instance out of its load balancer at once.
    probe: Pool,
    reads: Reads,
    /// Client-side bound of one read (statement plus connection wait).
    read_timeout: Duration,
    committed: Arc<Signals>,
}

/// Where reads that tolerate staleness go.
#[derive(Debug, Clone)]
enum Reads {
    Primary,
    /// SQLite in WAL mode: a read-only pool beside the writer's, always current.
    Sqlite(SqlitePool),
    Replicas(Arc<ReplicaSet>),
}

/// A transaction on either backend. A transaction that wrote something background
/// loops wait for (an event, a job) calls [`Tx::wake_on_commit`]; committing it
/// then wakes the in-process waiters of [`Database::commit_signal`] once the data
/// is visible, so nothing waits for a poll.
#[derive(Debug)]
pub enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>, Wake),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>, Wake),
}

/// Whom a transaction wakes at commit; and its span, open from begin to commit
/// or rollback, for traces.
#[derive(Debug)]
pub struct Wake {
    signals: Arc<Signals>,
    /// The [`Topic::bit`]s to wake at commit.
    armed: u8,
    _span: tracing::Span,
}

/// A span of a database call, for traces only (see `scaleshop_telemetry::trace`):
/// `what` is `transaction`, `query` or `read`. Only inside a trace (a request,
/// an event's handling, a job): off, or in a background poll, it costs one check.
#[doc(hidden)]
pub fn db_span(what: &'static str, pool: &Pool) -> tracing::Span {
    if !scaleshop_telemetry::trace::in_a_trace() {
        return tracing::Span::none();
    }
    let system = match pool {
        Pool::Sqlite(_) => "sqlite",
        Pool::Postgres(_) => "postgresql",
    };
    tracing::info_span!(
        target: scaleshop_telemetry::trace::SPANS,
        "db",
        otel.name = what,
        otel.kind = "client",
        db.system.name = system,
        db.replica = tracing::field::Empty,
    )
}

impl Tx {
    fn wake(&self) -> &Wake {
        match self {
            Self::Sqlite(_, wake) | Self::Postgres(_, wake) => wake,
        }
    }

    /// Wake this process's waiters of `topic`'s commit signal when this
    /// transaction commits. Other processes hear of it only through a
    /// `pg_notify` of [`Tx::notice`] in the transaction ([`Tx::wake_everywhere_on_commit`]).
    pub fn wake_on_commit(&mut self, topic: Topic) {
        match self {
            Self::Sqlite(_, wake) | Self::Postgres(_, wake) => wake.armed |= topic.bit(),
        }
    }

    /// Whether this transaction will wake the waiters of `topic` at commit (for
    /// `Events`: whether it appended to the event log).
    pub fn wakes(&self, topic: Topic) -> bool {
        self.wake().armed & topic.bit() != 0
    }

    /// The payload of this process's `pg_notify(COMMIT_CHANNEL, ..)` for `topic`,
    /// for a caller that sends it in a statement of its own.
    pub fn notice(&self, topic: Topic) -> String {
        self.wake().signals.notice(topic)
    }

    /// [`Tx::wake_on_commit`], and on PostgreSQL a notification that wakes the
    /// waiters of `topic` in every other process once this transaction commits.
    pub async fn wake_everywhere_on_commit(&mut self, topic: Topic) -> Result<(), StoreError> {
        self.wake_on_commit(topic);
        let notice = self.notice(topic);
        if let Self::Postgres(tx, _) = self {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(COMMIT_CHANNEL)
                .bind(notice)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(..) => Backend::Sqlite,
            Self::Postgres(..) => Backend::Postgres,
        }
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        let wake = match self {
            Self::Sqlite(tx, wake) => {
                tx.commit().await?;
                wake
            }
            Self::Postgres(tx, wake) => {
                tx.commit().await?;
                wake
            }
        };
        for topic in Topic::ALL {
            if wake.armed & topic.bit() != 0 {
                wake.signals.of(topic).notify_waiters();
            }
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(tx, _) => tx.rollback().await?,
            Self::Postgres(tx, _) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    #[error("cannot create the data folder {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("migration failed: {0}")]
    Migrate(String),
}

/// A service's migrations, one set per backend.
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    /// Owner of the tables; names the migration history table `_migrations_{owner}`
    /// so that services version their schemas independently.
    pub owner: &'static str,
    pub sqlite: &'static Migrator,
    pub postgres: &'static Migrator,
}

/// The probe's pool: one connection, opened on first use.
fn probe_options(settings: &PoolSettings) -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(Some(settings.idle_timeout))
        .acquire_timeout(settings.acquire_timeout)
}

impl Database {
    /// Opens the pool. `url` is `None` for SQLite in `data_dir`, or a `postgres://` URL.
    /// Never logs the URL (it may hold a password).
    pub async fn connect(
        url: Option<&str>,
        data_dir: &Path,
        settings: &PoolSettings,
    ) -> Result<Self, ConnectError> {
        match url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Self::connect_postgres(url, settings).await
            }
            Some(url) if url.starts_with("sqlite:") => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(|_| ConnectError::InvalidUrl("not a valid sqlite: URL".into()))?;
                Self::connect_sqlite(options, settings).await
            }
            Some(_) => Err(ConnectError::InvalidUrl(
                "expected postgres://..., postgresql://... or sqlite:...".into(),
            )),
            None => {
                std::fs::create_dir_all(data_dir).map_err(|source| ConnectError::DataDir {
                    path: data_dir.display().to_string(),
                    source,
                })?;
                let options = SqliteConnectOptions::new().filename(data_dir.join("scaleshop.db"));
                Self::connect_sqlite(options, settings).await
            }
        }
    }

    /// Opens (creating it when missing) the SQLite database in the file `path`:
    /// an embedded shard.
    pub async fn open_sqlite_file(
        path: &Path,
        settings: &PoolSettings,
    ) -> Result<Self, ConnectError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ConnectError::DataDir {
                path: parent.display().to_string(),
                source,
            })?;
        }
        Self::connect_sqlite(SqliteConnectOptions::new().filename(path), settings).await
    }

    async fn connect_sqlite(
        options: SqliteConnectOptions,
        settings: &PoolSettings,
    ) -> Result<Self, ConnectError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(settings.statement_timeout)
            .foreign_keys(true);
        let in_memory = options.get_filename() == Path::new(":memory:");
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(settings.min_connections)
            .idle_timeout(Some(settings.idle_timeout))
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options.clone())
            .await
            .map_err(|e| ConnectError::Connect(e.to_string()))?;
        let probe = Pool::Sqlite(probe_options(settings).connect_lazy_with(options.clone()));
        let mut db = Self::new(Pool::Sqlite(pool), probe, settings);
        if !in_memory {
            // The file exists and is in WAL mode now: readers never block the
            // writer, and a reader opened after a commit sees it.
            let reads = SqlitePoolOptions::new()
                .max_connections(settings.max_connections)
                .min_connections(settings.min_connections)
                .idle_timeout(Some(settings.idle_timeout))
                .acquire_timeout(settings.acquire_timeout)
                .connect_with(options.create_if_missing(false).read_only(true))
                .await
                .map_err(|e| ConnectError::Connect(e.to_string()))?;
            db.reads = Reads::Sqlite(reads);
        }
        Ok(db)
    }

    async fn connect_postgres(url: &str, settings: &PoolSettings) -> Result<Self, ConnectError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|_| ConnectError::InvalidUrl("not a valid postgres:// URL".into()))?
            .application_name("scaleshop")
            .options([(
                "statement_timeout",
                format!("{}ms", settings.statement_timeout.as_millis()),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(settings.min_connections)
            .idle_timeout(Some(settings.idle_timeout))
            .acquire_timeout(settings.acquire_timeout)
            .connect_with(options.clone())
            .await
            .map_err(|e| ConnectError::Connect(redact(&e.to_string())))?;
        let probe = Pool::Postgres(
            PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .idle_timeout(Some(settings.idle_timeout))
                .acquire_timeout(settings.acquire_timeout)
                .connect_lazy_with(options.application_name("scaleshop-probe")),
        );
        Ok(Self::new(Pool::Postgres(pool), probe, settings))
    }

    fn new(pool: Pool, probe: Pool, settings: &PoolSettings) -> Self {
        Self {
            pool,
            probe,
            reads: Reads::Primary,
            read_timeout: settings.statement_timeout + settings.acquire_timeout,
            committed: Arc::new(Signals::new()),
        }
    }

    /// Sends reads that tolerate staleness to these PostgreSQL streaming
    /// replicas (pools sized by `pool`, opened lazily: a replica that is down does
    /// not stop the start). Run [`Database::spawn_replica_monitor`] too, or no
    /// replica is ever healthy. Only with a PostgreSQL primary.
    pub fn with_replicas(
        mut self,
        urls: &[String],
        pool: &PoolSettings,
        settings: ReplicaSettings,
    ) -> Result<Self, ConnectError> {
        if urls.is_empty() {
            return Ok(self);
        }
        if self.backend() != Backend::Postgres {
            return Err(ConnectError::InvalidUrl(
                "read replicas need a PostgreSQL primary".into(),
            ));
        }
        self.reads = Reads::Replicas(Arc::new(ReplicaSet::connect(urls, pool, settings)?));
        Ok(self)
    }

    /// Samples the replicas' positions and lag until `shutdown` turns true.
    pub fn spawn_replica_monitor(
        &self,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (Reads::Replicas(set), Pool::Postgres(primary)) = (&self.reads, &self.pool) else {
            return None;
        };
        Some(tokio::spawn(set.clone().monitor(primary.clone(), shutdown)))
    }

    /// Each replica (`host:port`) and whether it gets reads; empty without
    /// replicas.
    pub fn replica_health(&self) -> Vec<(String, ReplicaHealth)> {
        match &self.reads {
            Reads::Replicas(set) => set.health(),
            _ => Vec::new(),
        }
    }

    /// Where a read that tolerates staleness runs: a healthy replica that has
    /// what `consistency` asks for, SQLite's read-only pool, or the primary.
    /// Reads inside a read-modify-write use the primary ([`Database::pool`] or a
    /// [`Tx`]), never this. Use it through [`read_with!`], which sends the read
    /// to the primary when the replica fails it.
    pub async fn reader(&self, consistency: Consistency) -> Reader {
        match &self.reads {
            Reads::Replicas(set) => match set.choose(consistency).await {
                Some(replica) => Reader {
                    pool: Pool::Postgres(replica.pool().clone()),
                    as_of_micros: Reader::as_of_replica(&replica),
                    replica: Some(replica),
                    timeout: self.read_timeout,
                },
                None => self.primary_reader(),
            },
            Reads::Sqlite(pool) => Reader {
                pool: Pool::Sqlite(pool.clone()),
                replica: None,
                as_of_micros: clock::now_micros(),
                timeout: self.read_timeout,
            },
            Reads::Primary => self.primary_reader(),
        }
    }

    fn primary_reader(&self) -> Reader {
        Reader {
            pool: self.pool.clone(),
            replica: None,
            as_of_micros: clock::now_micros(),
            timeout: self.read_timeout,
        }
    }

    /// After a replica failed a read: the read runs on the primary (a
    /// fallback). A replica that could not be reached gets no more reads until
    /// the monitor sees it answer again.
    pub fn replica_failed(&self, reader: &Reader, error: &StoreError) -> Reader {
        if let Some(replica) = &reader.replica {
            tracing::warn!(replica = %replica.label, error = %error, "read failed on a replica; reading the primary");
            if matches!(error, StoreError::Unavailable) {
                replica.mark_down();
            }
        }
        replicas::count_fallback();
        self.primary_reader()
    }

    /// The primary's WAL position now, for the consistency token of a write that
    /// has committed (read after the commit, in its own statement, so it covers
    /// the commit record). `None` without replicas (SQLite, or no replica
    /// configured: every read is current); [`WalPosition::UNKNOWN`] when the
    /// primary does not answer in time (reads with it go to the primary).
    pub async fn write_position(&self) -> Option<WalPosition> {
        let (Reads::Replicas(set), Pool::Postgres(pool)) = (&self.reads, &self.pool) else {
            return None;
        };
        let ask = sqlx::query_scalar::<_, Option<i64>>(replicas::PRIMARY_POSITION).fetch_one(pool);
        match tokio::time::timeout(set.settings.probe_timeout, ask).await {
            Ok(Ok(Some(p))) => Some(u64::try_from(p).map_or(WalPosition::UNKNOWN, WalPosition)),
            _ => Some(WalPosition::UNKNOWN),
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether `other` is a handle on the same pools (a clone of this one).
    pub fn same_as(&self, other: &Database) -> bool {
        Arc::ptr_eq(&self.committed, &other.committed)
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Begins a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers never deadlock upgrading a read lock.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match &self.pool {
            Pool::Sqlite(pool) => {
                Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?, self.wake())
            }
            Pool::Postgres(pool) => Tx::Postgres(pool.begin().await?, self.wake()),
        })
    }

    fn wake(&self) -> Wake {
        Wake {
            signals: self.committed.clone(),
            armed: 0,
            _span: db_span("transaction", &self.pool),
        }
    }

    /// Notified after every commit of a transaction that asked to wake the
    /// waiters of `topic` ([`Tx::wake_on_commit`]), and on PostgreSQL after such
    /// commits in other processes ([`Database::spawn_commit_listener`]). Register
    /// interest (`notified()` + `enable()`), then look at the state, then wait: no
    /// wake-up is missed.
    pub fn commit_signal(&self, topic: Topic) -> Arc<Notify> {
        self.committed.of(topic).clone()
    }

    /// Wakes the waiters of `topic`'s commit signal here and, on PostgreSQL, in
    /// every other process: for a change made outside a transaction that asked
    /// for it, such as a lease handed back, which a standby elsewhere waits for.
    pub async fn announce(&self, topic: Topic) -> Result<(), StoreError> {
        self.committed.of(topic).notify_waiters();
        if let Pool::Postgres(pool) = &self.pool {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(COMMIT_CHANNEL)
                .bind(self.committed.notice(topic))
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Applies a service's migrations (idempotent; safe to run from several processes
    /// on PostgreSQL, which takes an advisory lock).
    pub async fn migrate(&self, migrations: &Migrations) -> Result<(), ConnectError> {
        let source = match self.pool {
            Pool::Sqlite(_) => migrations.sqlite,
            Pool::Postgres(_) => migrations.postgres,
        };
        let mut migrator = Migrator::with_migrations(source.iter().cloned().collect());
        migrator.dangerous_set_table_name(format!("_migrations_{}", migrations.owner));
        let result = match &self.pool {
            Pool::Sqlite(pool) => migrator.run(pool).await,
            Pool::Postgres(pool) => migrator.run(pool).await,
        };
        result.map_err(|e| ConnectError::Migrate(format!("{}: {e}", migrations.owner)))
    }

    /// On PostgreSQL, listens on [`COMMIT_CHANNEL`] and turns notifications from
    /// any process into this process's commit signal, until `shutdown` turns true.
    /// Reconnects after a lost connection (waiters still poll meanwhile).
    pub fn spawn_commit_listener(
        &self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let Pool::Postgres(pool) = &self.pool else {
            return None;
        };
        let pool = pool.clone();
        let signals = self.committed.clone();
        Some(tokio::spawn(async move {
            loop {
                let listen = async {
                    // A connection of its own, outside the request pool (which
                    // it would otherwise hold for good).
                    let own = PgPoolOptions::new()
                        .max_connections(1)
                        .max_lifetime(None)
                        .idle_timeout(None)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_with((*pool.connect_options()).clone())
                        .await?;
                    let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
                    listener.listen(COMMIT_CHANNEL).await?;
                    // Whatever committed while no one listened was not announced:
                    // every waiter looks once now.
                    signals.wake_all();
                    // `None`: the connection was lost (notifications may be lost
                    // with it): start over, and look again once listening.
                    while let Some(notification) = listener.try_recv().await? {
                        signals.heard(notification.payload());
                    }
                    Err::<(), sqlx::Error>(sqlx::Error::Protocol(
                        "the LISTEN connection was closed".to_owned(),
                    ))
                };
                tokio::select! {
                    result = listen => {
                        if let Err(e) = result {
                            tracing::warn!(error = %e, "LISTEN connection lost; polling until it is back");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.changed() => return,
                        }
                        // No one hears the other processes' commits now: every
                        // waiter looks once a second until the listener is back.
                        signals.wake_all();
                    }
                    _ = shutdown.changed() => return,
                }
            }
        }))
    }

    /// A round trip to the database, bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let fut = async {
            match &self.probe {
                Pool::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
                Pool::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
            }
        };
        tokio::time::timeout(timeout, fut).await.unwrap_or(false)
    }

    /// Publishes `db_pool_connections{pool, state}`; called when metrics are scraped.
    pub fn report_pool_metrics(&self, pool_name: &'static str) {
        let (size, idle) = match &self.pool {
            Pool::Sqlite(pool) => (pool.size(), pool.num_idle()),
            Pool::Postgres(pool) => (pool.size(), pool.num_idle()),
        };
        let idle = u32::try_from(idle).unwrap_or(u32::MAX).min(size);
        let name = scaleshop_telemetry::names::DB_POOL_CONNECTIONS;
        metrics::gauge!(name, "pool" => pool_name, "state" => "idle").set(f64::from(idle));
        metrics::gauge!(name, "pool" => pool_name, "state" => "in_use").set(f64::from(size - idle));
    }

    pub async fn close(&self) {
        match &self.reads {
            Reads::Replicas(set) => set.close().await,
            Reads::Sqlite(pool) => pool.close().await,
            Reads::Primary => {}
        }
        for pool in [&self.probe, &self.pool] {
            match pool {
                Pool::Sqlite(pool) => pool.close().await,
                Pool::Postgres(pool) => pool.close().await,
            }
        }
    }
}

/// Removes a password from anything that looks like a connection string.
fn redact(message: &str) -> String {
    message
        .split_whitespace()
        .map(|word| match (word.find("://"), word.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &word[..scheme], &word[at + 1..])
            }
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A storage failure, classified for the layers above. Domain code matches on it
/// without knowing which engine produced it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write; the name of the constraint when the
    /// engine reports it.
    #[error("unique constraint violated")]
    Conflict(Option<String>),
    /// No connection could be had in time, or the engine is unreachable.
    #[error("database unavailable")]
    Unavailable,
    /// Anything else; logged by the HTTP layer, never shown to clients.
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::PoolTimedOut => {
                metrics::counter!(scaleshop_telemetry::names::DB_POOL_TIMEOUTS).increment(1);
                Self::Unavailable
            }
            sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                Self::Conflict(db.constraint().map(str::to_owned))
            }
            sqlx::Error::Database(db) => {
                // SQLite's "database is locked" after the busy timeout; PostgreSQL's
                // connection exceptions (class 08), statement timeout (57014),
                // shutdowns (57P01-57P03), too many connections (53300), a database
                // not accepting connections (55000) or gone (3D000): try later.
                let code = db.code().unwrap_or_default();
                if code.starts_with("08")
                    || matches!(
                        code.as_ref(),
                        "5" | "6"
                            | "517"
                            | "53300"
                            | "55000"
                            | "3D000"
                            | "57014"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                    )
                {
                    Self::Unavailable
                } else {
                    Self::Other(error.to_string())
                }
            }
            _ => Self::Other(error.to_string()),
        }
    }
}

/// A `LIKE` pattern matching values that contain `text` (lower-cased), with the
/// `$first, $first+1, ...`: `count` numbered placeholders for an `IN (...)` list
/// (both backends take `$N`). Callers bound `count` (a page of ids, at most a
/// few hundred), so that one statement reads a batch instead of one per id.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// pattern characters of `text` escaped (use `ESCAPE '\\'`).
pub fn like_contains(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Runs `$body` with `$pool` bound to the backend's pool. The body is compiled once
/// per backend, so one SQL text serves both (write `$1`-style parameters).
#[macro_export]
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {{
        let pool = $db.pool();
        // Open while the body runs: the call's duration, for traces.
        let _span = $crate::db_span("query", pool);
        match pool {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    }};
}

/// A read that tolerates staleness: runs `$body` (`?` works inside) with `$pool`
/// bound to the pool [`Database::reader`] chose for `$consistency`, bounded in
/// time; when a replica fails it (down, too slow, a query cancelled by a
/// recovery conflict, a table it has not replayed yet), runs it again on the
/// primary. Evaluates to `Result<_, StoreError>`.
#[macro_export]
macro_rules! read_with {
    ($db:expr, $consistency:expr, $pool:ident => $body:expr) => {
        $crate::read_with_as_of!($db, $consistency, $pool => $body).map(|(value, _)| value)
    };
}

/// [`read_with!`], also giving how fresh the read was: `Result<(_, i64), _>`, the
/// time (µs) before which every write was visible to it ([`Reader::as_of_micros`]).
#[macro_export]
macro_rules! read_with_as_of {
    ($db:expr, $consistency:expr, $pool:ident => $body:expr) => {{
        let db: &$crate::Database = &$db;
        let reader = db.reader($consistency).await;
        match $crate::read_once!(reader, $pool => $body) {
            Err(error) if reader.is_replica() => {
                let primary = db.replica_failed(&reader, &error);
                $crate::read_once!(primary, $pool => $body)
                    .map(|value| (value, primary.as_of_micros()))
            }
            other => other.map(|value| (value, reader.as_of_micros())),
        }
    }};
}

/// One bounded read on a [`Reader`]'s pool (see [`read_with!`]).
#[macro_export]
#[doc(hidden)]
macro_rules! read_once {
    ($reader:expr, $pool:ident => $body:expr) => {
        $reader
            .bounded(async {
                Ok::<_, $crate::StoreError>(match $reader.pool() {
                    $crate::Pool::Sqlite($pool) => $body,
                    $crate::Pool::Postgres($pool) => $body,
                })
            })
            .await
    };
}

/// Runs `$body` with `$conn` bound to the transaction's connection, once per
/// backend (see [`with_pool!`]).
#[macro_export]
macro_rules! with_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::Tx::Sqlite(tx, _) => {
                let $conn = &mut **tx;
                $body
            }
            $crate::Tx::Postgres(tx, _) => {
                let $conn = &mut **tx;
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_an_in_list() {
        assert_eq!(super::placeholders(1, 3), "$1, $2, $3");
        assert_eq!(super::placeholders(4, 1), "$4");
        assert_eq!(super::placeholders(1, 0), "");
    }

    use super::*;

    #[test]
    fn like_escapes_wildcards() {
        assert_eq!(like_contains("A_b%c\\"), "%a\\_b\\%c\\\\%");
    }

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(
            redact("error connecting to postgres://u:secret@h:5/db now"),
            "error connecting to postgres://***@h:5/db now"
        );
        assert_eq!(redact("no url here"), "no url here");
    }
}
