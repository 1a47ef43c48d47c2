//! Read replicas: which pool a read that tolerates staleness may use, and how far
//! behind each PostgreSQL streaming replica is.
//!
//! A monitor samples, about every 100 ms, the primary's WAL insert position and
//! each replica's replay position (`pg_last_wal_replay_lsn()`,
//! `pg_last_xact_replay_timestamp()`). A replica's data is as fresh as the latest
//! sample of the primary whose position it has replayed: its lag is the age of
//! that sample (`db_replica_lag_seconds{replica}`). A replica that does not answer
//! is down; one whose lag passes the bound is lagging; neither gets reads. With no
//! healthy replica, reads go to the primary (`db_replica_fallback_total`).
//!
//! A read that carries a write's position (read-your-writes) goes only to a
//! replica that has replayed it, waits a bounded time for one, then reads the
//! primary.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::clock::now_micros;
use crate::{ConnectError, Pool, PoolSettings, StoreError, redact};

/// How replicas are chosen. The defaults: sampled every 100 ms, no reads past
/// 1 s of lag, a read-your-writes read waits up to 200 ms for a replica.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// A replica further behind than this gets no reads.
    pub max_lag: Duration,
    /// How long a read with a write's position waits for a replica that has
    /// replayed it before it reads the primary.
    pub wait: Duration,
    /// How often positions are sampled.
    pub sample_every: Duration,
    /// Upper bound of one sampling query (a replica that does not answer in time
    /// is down).
    pub probe_timeout: Duration,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_millis(1000),
            wait: Duration::from_millis(200),
            sample_every: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(500),
        }
    }
}

/// A position in the primary's write-ahead log (bytes since its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WalPosition(pub u64);

impl WalPosition {
    /// A write whose position could not be read: only the primary is sure to
    /// have it.
    pub const UNKNOWN: Self = Self(u64::MAX);
}

/// What a read needs to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Anything a healthy replica holds (slightly stale, within the lag bound).
    #[default]
    Eventual,
    /// At least the writes up to this position (read-your-writes).
    After(WalPosition),
}

impl Consistency {
    /// From the position a consistency token carries, if any.
    pub fn after(position: Option<u64>) -> Self {
        position.map_or(Self::Eventual, |p| Self::After(WalPosition(p)))
    }
}

/// A replica as `/readyz` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaHealth {
    Up,
    Lagging,
    Down,
}

#[derive(Debug)]
pub(crate) struct Replica {
    /// `host:port`, never the password.
    pub(crate) label: String,
    pool: PgPool,
    /// The monitor's own connection, so a busy read pool never looks like a
    /// dead replica.
    probe: PgPool,
    up: AtomicBool,
    replay: AtomicU64,
    lag_micros: AtomicI64,
    as_of_micros: AtomicI64,
}

impl Replica {
    fn healthy(&self, max_lag: Duration) -> bool {
        self.up.load(Ordering::Acquire)
            && self.lag_micros.load(Ordering::Acquire)
                <= i64::try_from(max_lag.as_micros()).unwrap_or(i64::MAX)
    }

    fn replayed(&self, position: WalPosition) -> bool {
        self.replay.load(Ordering::Acquire) >= position.0
    }

    /// The replay position now, asked of the replica (bounded by `timeout`).
    async fn replay_now(&self, timeout: Duration) -> Option<u64> {
        let ask = sqlx::query_scalar::<_, Option<i64>>(REPLAY).fetch_one(&self.pool);
        let replay = tokio::time::timeout(timeout, ask).await.ok()?.ok()??;
        let replay = u64::try_from(replay).ok()?;
        self.replay.fetch_max(replay, Ordering::AcqRel);
        Some(replay)
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn mark_down(&self) {
        self.up.store(false, Ordering::Release);
    }
}

const REPLAY: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint";
const SAMPLE: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint, \
                      (EXTRACT(EPOCH FROM pg_last_xact_replay_timestamp()) * 1000000)::bigint";
pub(crate) const PRIMARY_POSITION: &str =
    "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint";

/// Every configured replica and the rules for choosing one.
#[derive(Debug)]
pub(crate) struct ReplicaSet {
    pub(crate) replicas: Vec<Arc<Replica>>,
    pub(crate) settings: ReplicaSettings,
    next: AtomicUsize,
}

impl ReplicaSet {
    /// Lazy pools (a replica that is down at start does not stop the start),
    /// sized like the primary's.
    pub(crate) fn connect(
        urls: &[String],
        pool: &PoolSettings,
        settings: ReplicaSettings,
    ) -> Result<Self, ConnectError> {
        let mut replicas = Vec::with_capacity(urls.len());
        for url in urls {
            let options: PgConnectOptions = url.parse().map_err(|_| {
                ConnectError::InvalidUrl(format!(
                    "not a valid postgres:// replica URL: {}",
                    redact(url)
                ))
            })?;
            let options = options.application_name("scaleshop").options([(
                "statement_timeout",
                format!("{}ms", pool.statement_timeout.as_millis()),
            )]);
            let label = format!("{}:{}", options.get_host(), options.get_port());
            let reads = PgPoolOptions::new()
                .max_connections(pool.max_connections)
                .min_connections(pool.min_connections)
                .idle_timeout(Some(pool.idle_timeout))
                .acquire_timeout(pool.acquire_timeout)
                .connect_lazy_with(options.clone());
            let probe = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(settings.probe_timeout)
                .connect_lazy_with(options);
            replicas.push(Arc::new(Replica {
                label,
                pool: reads,
                probe,
                // Down until the first sample says otherwise.
                up: AtomicBool::new(false),
                replay: AtomicU64::new(0),
                lag_micros: AtomicI64::new(i64::MAX),
                as_of_micros: AtomicI64::new(0),
            }));
        }
        Ok(Self {
            replicas,
            settings,
            next: AtomicUsize::new(0),
        })
    }

    /// A healthy replica (round robin) that has replayed `position`, if any.
    fn pick(&self, position: Option<WalPosition>) -> Option<Arc<Replica>> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.replicas[(start + i) % n])
            .find(|r| r.healthy(self.settings.max_lag) && position.is_none_or(|p| r.replayed(p)))
            .cloned()
    }

    /// The replica for a read, or `None` for the primary (counted as a fallback).
    pub(crate) async fn choose(&self, consistency: Consistency) -> Option<Arc<Replica>> {
        let chosen = match consistency {
            Consistency::Eventual => self.pick(None),
            Consistency::After(WalPosition::UNKNOWN) => None,
            Consistency::After(position) => self.wait_for(position).await,
        };
        if chosen.is_none() {
            count_fallback();
        }
        chosen
    }

    /// A healthy replica that has replayed `position`, asking the replicas
    /// themselves (the samples may be up to 100 ms old) until `wait` runs out.
    async fn wait_for(&self, position: WalPosition) -> Option<Arc<Replica>> {
        if let Some(replica) = self.pick(Some(position)) {
            return Some(replica);
        }
        let deadline = Instant::now() + self.settings.wait;
        loop {
            for replica in &self.replicas {
                if !replica.healthy(self.settings.max_lag) {
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let bound = left.min(self.settings.probe_timeout);
                if bound.is_zero() {
                    return None;
                }
                if replica
                    .replay_now(bound)
                    .await
                    .is_some_and(|r| r >= position.0)
                {
                    return Some(replica.clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            tokio::time::sleep(left.min(Duration::from_millis(5))).await;
        }
    }

    pub(crate) fn health(&self) -> Vec<(String, ReplicaHealth)> {
        self.replicas
            .iter()
            .map(|r| {
                let health = if !r.up.load(Ordering::Acquire) {
                    ReplicaHealth::Down
                } else if r.healthy(self.settings.max_lag) {
                    ReplicaHealth::Up
                } else {
                    ReplicaHealth::Lagging
                };
                (r.label.clone(), health)
            })
            .collect()
    }

    /// Samples every `sample_every` until `shutdown` turns true.
    pub(crate) async fn monitor(
        self: Arc<Self>,
        primary: PgPool,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        // (primary position, when it was asked): a replica that has replayed a
        // position holds everything committed before that time.
        let mut history: VecDeque<(u64, i64)> = VecDeque::new();
        let keep = i64::try_from((self.settings.max_lag * 10).as_micros())
            .unwrap_or(i64::MAX)
            .max(10_000_000);
        loop {
            self.sample(&primary, &mut history, keep).await;
            tokio::select! {
                () = tokio::time::sleep(self.settings.sample_every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn sample(&self, primary: &PgPool, history: &mut VecDeque<(u64, i64)>, keep: i64) {
        let timeout = self.settings.probe_timeout;
        // Asked after taking the time: the position covers every commit before it.
        let asked_at = now_micros();
        let position = sqlx::query_scalar::<_, Option<i64>>(PRIMARY_POSITION).fetch_one(primary);
        if let Ok(Ok(Some(p))) = tokio::time::timeout(timeout, position).await {
            history.push_back((u64::try_from(p).unwrap_or(0), asked_at));
        }
        while history
            .front()
            .is_some_and(|(_, at)| asked_at - at > keep && history.len() > 1)
        {
            history.pop_front();
        }
        let mut samples = tokio::task::JoinSet::new();
        for (i, replica) in self.replicas.iter().enumerate() {
            let probe = replica.probe.clone();
            samples.spawn(async move {
                let ask = sqlx::query_as::<_, (Option<i64>, Option<i64>)>(SAMPLE).fetch_one(&probe);
                (i, tokio::time::timeout(timeout, ask).await)
            });
        }
        while let Some(done) = samples.join_next().await {
            let Ok((i, answer)) = done else { continue };
            let replica = &self.replicas[i];
            match answer {
                Ok(Ok((Some(replay), replayed_commit))) => {
                    let replay = u64::try_from(replay).unwrap_or(0);
                    let now = now_micros();
                    // The latest primary sample this replica has replayed; older
                    // than every sample: the time of its last replayed commit.
                    let as_of = history
                        .iter()
                        .rev()
                        .find(|(p, _)| *p <= replay)
                        .map(|(_, at)| *at)
                        .or(replayed_commit)
                        .unwrap_or(0);
                    let lag = (now - as_of).max(0);
                    replica.replay.fetch_max(replay, Ordering::AcqRel);
                    replica.as_of_micros.store(as_of, Ordering::Release);
                    replica.lag_micros.store(lag, Ordering::Release);
                    replica.up.store(true, Ordering::Release);
                    #[expect(clippy::cast_precision_loss, reason = "a gauge in seconds")]
                    let seconds = lag as f64 / 1e6;
                    metrics::gauge!(
                        scaleshop_telemetry::names::DB_REPLICA_LAG,
                        "replica" => replica.label.clone()
                    )
                    .set(seconds);
                }
                Ok(Ok((None, _))) => {
                    // Not in recovery: not a replica of anything.
                    if replica.up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(replica = %replica.label, "not a standby; no reads sent to it");
                    }
                }
                Ok(Err(e)) => {
                    if replica.up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(replica = %replica.label, error = %redact(&e.to_string()), "replica down");
                    }
                }
                Err(_) => {
                    if replica.up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(replica = %replica.label, "replica did not answer in time");
                    }
                }
            }
        }
    }

    pub(crate) async fn close(&self) {
        for replica in &self.replicas {
            replica.pool.close().await;
            replica.probe.close().await;
        }
    }
}

pub(crate) fn count_fallback() {
    metrics::counter!(scaleshop_telemetry::names::DB_REPLICA_FALLBACK).increment(1);
}

/// The pool a read runs on, and how fresh its data is at least.
#[derive(Debug)]
pub struct Reader {
    pub(crate) pool: Pool,
    pub(crate) replica: Option<Arc<Replica>>,
    pub(crate) as_of_micros: i64,
    pub(crate) timeout: Duration,
}

impl Reader {
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn is_replica(&self) -> bool {
        self.replica.is_some()
    }

    /// Every write that committed before this time (µs since the epoch, this
    /// process's clock) is visible to this reader: for a cache entry's stamp.
    pub fn as_of_micros(&self) -> i64 {
        self.as_of_micros
    }

    pub(crate) fn as_of_replica(replica: &Replica) -> i64 {
        replica.as_of_micros.load(Ordering::Acquire)
    }

    /// Bounds one read: the statement and the wait for a connection.
    pub async fn bounded<T>(
        &self,
        read: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        use tracing::Instrument;
        let span = crate::db_span("read", &self.pool);
        if let Some(replica) = &self.replica {
            span.record("db.replica", replica.label.as_str());
        }
        tokio::time::timeout(self.timeout, read)
            .instrument(span)
            .await
            .unwrap_or(Err(StoreError::Unavailable))
    }
}
