//! `bench-messaging --backend sqlite|postgres [--pg-url URL] [--events N] [--jobs N]
//! [--runs R] [--tasks T]`: throughput of the event log and of the job queue,
//! each against the raw commit rate of the same database, measured in the same run.
//!
//! Each run gets a fresh database (`scaleshop_testkit::fresh`, migrated with the
//! events and jobs migrations; on PostgreSQL a new database on the cluster of
//! `--pg-url` or `SCALESHOP_TEST_PG_URL`, dropped afterwards) and measures, in order:
//!
//! - (a) inserts/s: N single-row inserts into a bench table, each in its own
//!   transaction (`Database::begin`, one `INSERT`, commit), from T tasks;
//! - (b) events/s: N events appended with `scaleshop_events::append`, each in its own
//!   transaction, from T tasks, while a `Dispatcher` with one no-op `Consumer` runs;
//!   timed from the first append until `event_consumers.position` reaches the last
//!   sequence (appends/s, the time until the last append committed, is shown too);
//! - (b2) drain/s: the dispatcher's own rate: N more events appended with no
//!   dispatcher running, then a dispatcher started; timed from its start until the
//!   consumer's position reaches the last sequence;
//! - (c) jobs/s: N no-op jobs enqueued with `JobQueue::enqueue` (one transaction
//!   each, from T tasks; enqueues/s is shown too), then `Workers` with one queue of
//!   concurrency 5; timed from the workers' start until every job is `completed`.
//!
//! With `--nats URL` (a nats-server with JetStream; the streams are deleted
//! before each phase that uses them), each run also measures, on fresh databases:
//!
//! - (d) the same N events over NATS: appended as in (b) while a dispatcher with
//!   `with_nats` runs; relayed/s until the relay's position reaches the last
//!   sequence, events/s until the consumer's position does;
//! - (e) raw JetStream publishes/s: N messages of an event's size published to a
//!   scratch stream with the same settings, pipelined and acknowledged in batches
//!   as the relay does: the broker's own rate on this machine.
//!
//! With `--latency-rate R`, each run also sends `--latency-events M` events, one
//! transaction each, at R a second (open loop: on a fixed schedule, whatever the
//! consumer does), and reports the time from each event's creation (just before
//! its commit) to its handler, p50 and p99, over the database transport and (with
//! `--nats`) over NATS.
//!
//! Prints every run, the medians and the ratios events/s ÷ inserts/s and
//! jobs/s ÷ inserts/s (per run, then their median) as markdown.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::{Parser, ValueEnum};
use scaleshop_bench::{median, percentile, ratio, show};
use scaleshop_db::sqlx::{self, Connection};
use scaleshop_db::{Database, Pool, PoolSettings, StoreError, with_pool, with_tx};
use scaleshop_events::nats::NatsSettings;
use scaleshop_events::{Consumer, Dispatcher, DispatcherSettings, Event, HandlerError, NewEvent};
use scaleshop_jobs::{Job, JobError, JobHandler, JobQueue, NewJob, WorkerSettings, Workers};
use scaleshop_testkit::Backend;
use tokio::sync::{Notify, watch};

const PG_URL_VAR: &str = "SCALESHOP_TEST_PG_URL";
const QUEUE: &str = "bench";
const JOB_CONCURRENCY: usize = 5;
const EVENT_TYPE: &str = "bench.event";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Sqlite,
    Postgres,
}

#[derive(Debug, Parser)]
#[command(
    name = "bench-messaging",
    about = "Raw insert rate vs events/s (append -> dispatch -> consumer) vs jobs/s (no-op jobs), same run, fresh database per run."
)]
struct Args {
    #[arg(long, value_enum)]
    backend: BackendArg,
    /// Admin URL of the PostgreSQL cluster on which fresh databases are created
    /// (default: SCALESHOP_TEST_PG_URL).
    #[arg(long, value_name = "URL")]
    pg_url: Option<String>,
    /// Events per run; also the number of raw inserts.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    events: u32,
    /// Jobs per run.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    jobs: u32,
    /// Runs, each on a fresh database.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Concurrent writer tasks for the inserts, the appends and the enqueues.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    tasks: u32,
    /// A nats-server with JetStream: also measure the events over NATS (its
    /// streams are deleted before each phase that uses them).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Also measure the latency from an event's commit to its handler, sending
    /// events at this rate (per second, open loop).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    latency_rate: Option<u32>,
    /// Events sent for the latency, per transport and run.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    latency_events: u32,
    /// Upper bound of each measured phase, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_secs: u64,
}

/// The figures of one run, in items per second.
#[derive(Debug, Clone, Copy)]
struct RunFigures {
    inserts: f64,
    appends: f64,
    events: f64,
    /// (b2): the dispatcher draining a backlog.
    drain: f64,
    enqueues: f64,
    jobs: f64,
    nats: Option<NatsFigures>,
    /// Commit to handler, (p50, p99) in ms: the database transport, then NATS.
    latency_db: Option<(f64, f64)>,
    latency_nats: Option<(f64, f64)>,
}

/// The events over NATS, per second.
#[derive(Debug, Clone, Copy)]
struct NatsFigures {
    appends: f64,
    relayed: f64,
    events: f64,
    raw_publishes: f64,
}

type BenchResult<T> = Result<T, String>;

fn err(context: &str) -> impl Fn(StoreError) -> String + '_ {
    move |e| format!("{context}: {e}")
}

fn per_second(count: u32, elapsed: Duration) -> f64 {
    f64::from(count) / elapsed.as_secs_f64().max(1e-9)
}

/// Indices `0..n` dealt round-robin to `tasks` tasks.
fn share(n: u32, tasks: u32, task: u32) -> impl Iterator<Item = u32> {
    (task..n).step_by(usize::try_from(tasks).unwrap_or(1).max(1))
}

/// Waits until `done()` holds, woken by `notify` (or every 50 ms), up to `deadline`.
async fn wait_until(
    what: &str,
    deadline: Instant,
    notify: &Notify,
    done: impl Fn() -> bool,
) -> BenchResult<()> {
    while !done() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notify.notified()).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- (a) inserts

const CREATE_BENCH_TABLE: &str =
    "CREATE TABLE bench_rows (id BIGINT PRIMARY KEY, payload TEXT NOT NULL)";
const INSERT_BENCH_ROW: &str = "INSERT INTO bench_rows (id, payload) VALUES ($1, $2)";

async fn insert_one(db: &Database, id: i64) -> Result<(), StoreError> {
    let mut tx = db.begin().await?;
    with_tx!(&mut tx, conn => {
        sqlx::query(INSERT_BENCH_ROW).bind(id).bind("bench row").execute(conn).await?;
    });
    tx.commit().await
}

async fn raw_inserts(db: &Database, n: u32, tasks: u32) -> BenchResult<Duration> {
    with_pool!(db, pool => sqlx::query(CREATE_BENCH_TABLE).execute(pool).await.map(drop))
        .map_err(|e| format!("create bench table: {e}"))?;
    let start = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let db = db.clone();
        handles.push(tokio::spawn(async move {
            for i in share(n, tasks, task) {
                insert_one(&db, i64::from(i)).await?;
            }
            Ok::<(), StoreError>(())
        }));
    }
    for handle in handles {
        handle
            .await
            .map_err(|e| format!("insert task: {e}"))?
            .map_err(err("insert"))?;
    }
    let elapsed = start.elapsed();
    let count: i64 = with_pool!(db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM bench_rows").fetch_one(pool).await
    })
    .map_err(|e| format!("count bench rows: {e}"))?;
    if count != i64::from(n) {
        return Err(format!("expected {n} bench rows, found {count}"));
    }
    Ok(elapsed)
}

// ----------------------------------------------------------------- (b) events

/// Does nothing with each event but note the highest sequence it was handed.
struct NoopConsumer {
    seen: Arc<AtomicI64>,
    notify: Arc<Notify>,
    /// Milliseconds from each event's creation to its handler, when measured.
    latencies: Option<Arc<tokio::sync::Mutex<Vec<f64>>>>,
}

#[async_trait]
impl Consumer for NoopConsumer {
    fn name(&self) -> &'static str {
        "bench-noop"
    }

    fn wants(&self, _event_type: &str) -> bool {
        true
    }

    async fn handle(&self, event: &Event, _tx: &mut scaleshop_db::Tx) -> Result<(), HandlerError> {
        if let Some(latencies) = &self.latencies {
            let ms = (chrono::Utc::now() - event.occurred_at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0;
            latencies.lock().await.push(ms);
        }
        self.seen.fetch_max(event.sequence, Ordering::Relaxed);
        self.notify.notify_one();
        Ok(())
    }
}

async fn append_one(db: &Database, n: u32) -> Result<i64, StoreError> {
    let event = NewEvent::raw(
        EVENT_TYPE,
        1,
        uuid::Uuid::now_v7(),
        serde_json::json!({ "n": n }),
    );
    let mut tx = db.begin().await?;
    let sequence = scaleshop_events::append(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(sequence)
}

async fn consumer_position(db: &Database) -> Result<i64, StoreError> {
    const Q: &str = "SELECT position FROM event_consumers WHERE name = $1";
    Ok(with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind("bench-noop").fetch_one(pool).await?
    }))
}

async fn relay_position(db: &Database) -> Result<i64, StoreError> {
    const Q: &str = "SELECT COALESCE(MAX(position), 0) FROM event_relays";
    Ok(with_pool!(db, pool => sqlx::query_scalar(Q).fetch_one(pool).await?))
}

/// The time of each stage of (b) or (d), from the first append.
struct Timings {
    appended: Duration,
    /// Over NATS: until the relay's position reached the last sequence.
    relayed: Option<Duration>,
    delivered: Duration,
}

fn dispatcher(db: &Database, nats: Option<&NatsSettings>, consumer: NoopConsumer) -> Dispatcher {
    let mut dispatcher = Dispatcher::new(db.clone(), DispatcherSettings::default());
    if let Some(nats) = nats {
        dispatcher = dispatcher.with_nats(nats.clone());
    }
    dispatcher.subscribe(Arc::new(consumer));
    dispatcher
}

impl NoopConsumer {
    /// A consumer that only records the highest sequence it was handed (and
    /// wakes `notify`): the sequence and the notifier to wait on.
    fn counting() -> (Self, Arc<AtomicI64>, Arc<Notify>) {
        let seen = Arc::new(AtomicI64::new(0));
        let notify = Arc::new(Notify::new());
        let consumer = Self {
            seen: seen.clone(),
            notify: notify.clone(),
            latencies: None,
        };
        (consumer, seen, notify)
    }
}

/// N events from T tasks, over the database or over NATS.
async fn events(
    db: &Database,
    nats: Option<&NatsSettings>,
    n: u32,
    tasks: u32,
    timeout: Duration,
) -> BenchResult<Timings> {
    let (consumer, seen, notify) = NoopConsumer::counting();
    let (stop_tx, stop_rx) = watch::channel(false);
    let dispatcher = dispatcher(db, nats, consumer);
    let running = dispatcher
        .start(stop_rx)
        .await
        .map_err(err("start dispatcher"))?;

    let start = Instant::now();
    let deadline = start + timeout;
    let last = append_all(db, n, tasks).await?;
    let appended = start.elapsed();
    let mut relayed = None;
    if nats.is_some() {
        while relay_position(db)
            .await
            .map_err(err("read the relay's position"))?
            < last
        {
            if Instant::now() >= deadline {
                return Err("timed out waiting for the relay".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        relayed = Some(start.elapsed());
    }
    delivered_up_to(db, &seen, &notify, last, deadline).await?;
    let delivered = start.elapsed();

    stop_dispatcher(&stop_tx, running).await?;
    if last < i64::from(n) {
        return Err(format!(
            "expected at least sequence {n}, the last is {last}"
        ));
    }
    Ok(Timings {
        appended,
        relayed,
        delivered,
    })
}

/// Stops a dispatcher started with `stop`'s receiver and waits (bounded) for it.
async fn stop_dispatcher<E: std::fmt::Display>(
    stop: &watch::Sender<bool>,
    running: impl std::future::Future<Output = Result<(), E>>,
) -> BenchResult<()> {
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .map_err(|_| "the dispatcher did not stop within 30 s".to_owned())?
        .map_err(|e| format!("dispatcher task: {e}"))
}

/// N `scaleshop_events::append` calls, one transaction each, from T tasks; the
/// last sequence.
async fn append_all(db: &Database, n: u32, tasks: u32) -> BenchResult<i64> {
    let mut handles = Vec::new();
    for task in 0..tasks {
        let db = db.clone();
        handles.push(tokio::spawn(async move {
            let mut last = 0;
            for i in share(n, tasks, task) {
                last = last.max(append_one(&db, i).await?);
            }
            Ok::<i64, StoreError>(last)
        }));
    }
    let mut last = 0;
    for handle in handles {
        let task_last = handle
            .await
            .map_err(|e| format!("append task: {e}"))?
            .map_err(err("append"))?;
        last = last.max(task_last);
    }
    Ok(last)
}

/// Waits until the consumer was handed `last` (no database load while waiting),
/// then until its position, committed, reaches it.
async fn delivered_up_to(
    db: &Database,
    seen: &AtomicI64,
    notify: &Notify,
    last: i64,
    deadline: Instant,
) -> BenchResult<()> {
    wait_until("the consumer", deadline, notify, || {
        seen.load(Ordering::Relaxed) >= last
    })
    .await?;
    loop {
        if consumer_position(db).await.map_err(err("read position"))? >= last {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err("timed out waiting for the consumer position".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// (b2) The dispatcher's own rate: N events appended first, with no dispatcher
/// running; then a dispatcher starts, timed from its start until the consumer's
/// position reaches the last sequence.
async fn drain(db: &Database, n: u32, tasks: u32, timeout: Duration) -> BenchResult<Duration> {
    let last = append_all(db, n, tasks).await?;
    let (consumer, seen, notify) = NoopConsumer::counting();
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let running = dispatcher(db, None, consumer)
        .start(stop_rx)
        .await
        .map_err(err("start dispatcher"))?;
    delivered_up_to(db, &seen, &notify, last, start + timeout).await?;
    let drained = start.elapsed();
    stop_dispatcher(&stop_tx, running).await?;
    Ok(drained)
}

/// M events at `rate` a second on a fixed schedule, one transaction each; the
/// latency from each event's creation to its handler: (p50, p99) in ms.
async fn latency(
    db: &Database,
    nats: Option<&NatsSettings>,
    rate: u32,
    m: u32,
    timeout: Duration,
) -> BenchResult<(f64, f64)> {
    let seen = Arc::new(AtomicI64::new(0));
    let notify = Arc::new(Notify::new());
    let latencies = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(m as usize)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let consumer = NoopConsumer {
        seen: seen.clone(),
        notify: notify.clone(),
        latencies: Some(latencies.clone()),
    };
    let running = dispatcher(db, nats, consumer)
        .start(stop_rx)
        .await
        .map_err(err("start dispatcher"))?;
    // Let the relay and the consumer settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = Instant::now() + timeout;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..m {
        ticks.tick().await;
        let db = db.clone();
        // Each append on its own task, so a slow commit does not delay the next.
        sends.spawn(async move { append_one(&db, i).await });
    }
    let mut last = 0;
    while let Some(sent) = sends.join_next().await {
        let sequence = sent
            .map_err(|e| format!("append task: {e}"))?
            .map_err(err("append"))?;
        last = last.max(sequence);
    }
    wait_until("the consumer", deadline, &notify, || {
        seen.load(Ordering::Relaxed) >= last
    })
    .await?;
    stop_dispatcher(&stop_tx, running).await?;
    let latencies = latencies.lock().await.clone();
    Ok((
        percentile(&latencies, 50.0).unwrap_or(f64::NAN),
        percentile(&latencies, 99.0).unwrap_or(f64::NAN),
    ))
}

// ---------------------------------------------------------------- (d), (e) NATS

/// Deletes the event streams (and with them their consumers), as a fresh
/// database needs a fresh transport.
async fn reset_streams(context: &async_nats::jetstream::Context) -> BenchResult<()> {
    for name in [
        scaleshop_events::nats::STREAM,
        scaleshop_events::nats::DEAD_STREAM,
        RAW_STREAM,
    ] {
        if context.get_stream(name).await.is_ok() {
            context
                .delete_stream(name)
                .await
                .map_err(|e| format!("delete stream {name}: {e}"))?;
        }
    }
    Ok(())
}

const RAW_STREAM: &str = "BENCH_RAW";

/// N messages the size of an event, to a scratch stream with the event
/// stream's settings, in pipelined batches of the relay's size.
async fn raw_publishes(
    context: &async_nats::jetstream::Context,
    nats: &NatsSettings,
    n: u32,
) -> BenchResult<Duration> {
    let mut config = scaleshop_events::nats::stream_config(nats);
    config.name = RAW_STREAM.to_owned();
    config.subjects = vec!["bench.raw.>".to_owned()];
    context
        .create_stream(config)
        .await
        .map_err(|e| format!("create the scratch stream: {e}"))?;
    let payload = bytes::Bytes::from(
        serde_json::to_vec(&Event {
            id: uuid::Uuid::now_v7(),
            sequence: 1,
            kind: EVENT_TYPE.to_owned(),
            version: 1,
            aggregate_id: uuid::Uuid::now_v7(),
            occurred_at: chrono::Utc::now(),
            data: sqlx::types::Json(serde_json::json!({ "n": 1 })),
            traceparent: None,
        })
        .map_err(|e| e.to_string())?,
    );
    let batch = u32::try_from(nats.relay_batch).unwrap_or(256).max(1);
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let mut acks = Vec::new();
        for _ in 0..batch.min(n - sent) {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(uuid::Uuid::now_v7().to_string());
            acks.push(
                context
                    .send_publish("bench.raw.event", message)
                    .await
                    .map_err(|e| format!("publish: {e}"))?,
            );
            sent += 1;
        }
        for ack in acks {
            ack.await.map_err(|e| format!("publish ack: {e}"))?;
        }
    }
    Ok(start.elapsed())
}

// ------------------------------------------------------------------- (c) jobs

/// Does nothing but count the jobs it ran.
struct NoopJob {
    ran: Arc<AtomicUsize>,
    notify: Arc<Notify>,
}

#[async_trait]
impl JobHandler for NoopJob {
    async fn run(&self, _job: &Job) -> Result<(), JobError> {
        self.ran.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
        Ok(())
    }
}

async fn count_jobs(db: &Database, completed: bool) -> Result<i64, StoreError> {
    const DONE: &str = "SELECT COUNT(*) FROM jobs WHERE queue = $1 AND state = 'completed'";
    const OTHER: &str = "SELECT COUNT(*) FROM jobs WHERE queue = $1 AND state <> 'completed'";
    let q = if completed { DONE } else { OTHER };
    Ok(with_pool!(db, pool => sqlx::query_scalar(q).bind(QUEUE).fetch_one(pool).await?))
}

/// Returns (time to enqueue every job, time from the workers' start until every
/// job is completed).
async fn jobs(
    db: &Database,
    n: u32,
    tasks: u32,
    timeout: Duration,
) -> BenchResult<(Duration, Duration)> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let queue = JobQueue::new(db.clone());
        handles.push(tokio::spawn(async move {
            for i in share(n, tasks, task) {
                queue
                    .enqueue(&NewJob::new(QUEUE, serde_json::json!({ "n": i })))
                    .await?;
            }
            Ok::<(), StoreError>(())
        }));
    }
    for handle in handles {
        handle
            .await
            .map_err(|e| format!("enqueue task: {e}"))?
            .map_err(err("enqueue"))?;
    }
    let enqueued = start.elapsed();

    let ran = Arc::new(AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = Workers::new(db.clone(), WorkerSettings::default());
    workers.register(
        QUEUE,
        JOB_CONCURRENCY,
        Arc::new(NoopJob {
            ran: ran.clone(),
            notify: notify.clone(),
        }),
    );
    let want = usize::try_from(n).unwrap_or(usize::MAX);
    let start = Instant::now();
    let deadline = start + timeout;
    let running = workers.start(stop_rx);
    wait_until("the workers", deadline, &notify, || {
        ran.load(Ordering::Relaxed) >= want
    })
    .await?;
    loop {
        if count_jobs(db, true).await.map_err(err("count jobs"))? >= i64::from(n) {
            break;
        }
        if Instant::now() >= deadline {
            return Err("timed out waiting for the jobs to be completed".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let completed = start.elapsed();

    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .map_err(|_| "the workers did not stop within 30 s".to_owned())?
        .map_err(|e| format!("workers task: {e}"))?;
    let others = count_jobs(db, false).await.map_err(err("count jobs"))?;
    if others != 0 {
        return Err(format!(
            "{others} jobs ended in a state other than completed"
        ));
    }
    Ok((enqueued, completed))
}

// ------------------------------------------------------------------ the runs

/// What the product's connection settings make of durability, read back from the
/// database itself.
async fn describe(db: &Database) -> BenchResult<String> {
    match db.pool() {
        Pool::Sqlite(pool) => {
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(pool)
                .await
                .map_err(|e| e.to_string())?;
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .map_err(|e| e.to_string())?;
            let synchronous = match synchronous {
                0 => "OFF",
                1 => "NORMAL",
                2 => "FULL",
                3 => "EXTRA",
                _ => "?",
            };
            Ok(format!(
                "SQLite, the product's connection settings (journal_mode={journal}, synchronous={synchronous}), a fresh file per run"
            ))
        }
        Pool::Postgres(pool) => {
            let mut settings = Vec::new();
            for name in [
                "server_version",
                "fsync",
                "synchronous_commit",
                "full_page_writes",
            ] {
                let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
                    .fetch_one(pool)
                    .await
                    .map_err(|e| e.to_string())?;
                settings.push(format!("{name}={value}"));
            }
            Ok(format!("PostgreSQL ({})", settings.join(", ")))
        }
    }
}

/// Opens every connection the writers will use, so that no timed phase pays for
/// connecting.
async fn warm_pool(db: &Database, connections: u32) -> BenchResult<()> {
    with_pool!(db, pool => {
        let mut held = Vec::new();
        for _ in 0..connections {
            let mut conn = pool.acquire().await.map_err(|e| format!("warm pool: {e}"))?;
            sqlx::query("SELECT 1").execute(&mut *conn).await.map_err(|e| format!("warm pool: {e}"))?;
            held.push(conn);
        }
        drop(held);
    });
    Ok(())
}

struct Fresh {
    db: Database,
    dir: PathBuf,
    url: Option<String>,
    stop_listener: watch::Sender<bool>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

async fn open(backend: Backend, tasks: u32) -> BenchResult<Fresh> {
    let (url, dir) = scaleshop_testkit::fresh(backend).await;
    // As scaleshop_testkit::fresh_database does, keeping the URL to drop it later.
    let settings = PoolSettings {
        min_connections: 0,
        ..PoolSettings::default()
    };
    let db = Database::connect(url.as_deref(), &dir, &settings)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    for migrations in [scaleshop_events::migrations(), scaleshop_jobs::migrations()] {
        db.migrate(&migrations)
            .await
            .map_err(|e| format!("migrate: {e}"))?;
    }
    // As the app does: on PostgreSQL, commits of other processes wake us too.
    let (stop_listener, stop_rx) = watch::channel(false);
    let listener = db.spawn_commit_listener(stop_rx);
    warm_pool(&db, tasks + 2).await?;
    Ok(Fresh {
        db,
        dir,
        url,
        stop_listener,
        listener,
    })
}

async fn close(fresh: Fresh) -> BenchResult<()> {
    let _ = fresh.stop_listener.send(true);
    if let Some(listener) = fresh.listener {
        let _ = tokio::time::timeout(Duration::from_secs(10), listener).await;
    }
    fresh.db.close().await;
    let _ = std::fs::remove_dir_all(&fresh.dir);
    if let Some(url) = fresh.url {
        let name = url.rsplit_once('/').map(|(_, name)| name.to_owned());
        let admin = std::env::var(PG_URL_VAR).map_err(|_| format!("{PG_URL_VAR} is unset"))?;
        if let Some(name) = name {
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .map_err(|e| format!("connect to drop the bench database: {e}"))?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("drop the bench database: {e}"))?;
            let _ = conn.close().await;
        }
    }
    Ok(())
}

async fn one_run(
    backend: Backend,
    args: &Args,
    describe_first: bool,
) -> BenchResult<(RunFigures, Option<String>)> {
    let fresh = open(backend, args.tasks).await?;
    let outcome = measure(&fresh.db, args, describe_first).await;
    let closed = close(fresh).await;
    let figures = outcome?;
    closed?;
    Ok(figures)
}

async fn measure(
    db: &Database,
    args: &Args,
    describe_first: bool,
) -> BenchResult<(RunFigures, Option<String>)> {
    let description = if describe_first {
        Some(describe(db).await?)
    } else {
        None
    };
    let timeout = Duration::from_secs(args.timeout_secs);
    let inserted = tokio::time::timeout(timeout, raw_inserts(db, args.events, args.tasks))
        .await
        .map_err(|_| "timed out inserting rows".to_owned())??;
    let over_db = events(db, None, args.events, args.tasks, timeout).await?;
    let drained = drain(db, args.events, args.tasks, timeout).await?;
    let (enqueued, completed) = tokio::time::timeout(
        timeout.saturating_mul(2),
        jobs(db, args.jobs, args.tasks, timeout),
    )
    .await
    .map_err(|_| "timed out running jobs".to_owned())??;
    Ok((
        RunFigures {
            inserts: per_second(args.events, inserted),
            appends: per_second(args.events, over_db.appended),
            events: per_second(args.events, over_db.delivered),
            drain: per_second(args.events, drained),
            enqueues: per_second(args.jobs, enqueued),
            jobs: per_second(args.jobs, completed),
            nats: None,
            latency_db: None,
            latency_nats: None,
        },
        description,
    ))
}

/// (d) and (e), each phase on a fresh database and fresh streams.
async fn measure_nats(
    backend: Backend,
    args: &Args,
    nats: &NatsSettings,
) -> BenchResult<NatsFigures> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let context = scaleshop_events::nats::connect(nats)
        .await
        .map_err(|e| e.to_string())?;
    reset_streams(&context).await?;
    let fresh = open(backend, args.tasks).await?;
    let over_nats = events(&fresh.db, Some(nats), args.events, args.tasks, timeout).await;
    close(fresh).await?;
    let over_nats = over_nats?;
    reset_streams(&context).await?;
    let raw = tokio::time::timeout(timeout, raw_publishes(&context, nats, args.events))
        .await
        .map_err(|_| "timed out publishing".to_owned())??;
    reset_streams(&context).await?;
    Ok(NatsFigures {
        appends: per_second(args.events, over_nats.appended),
        relayed: per_second(
            args.events,
            over_nats.relayed.unwrap_or(over_nats.delivered),
        ),
        events: per_second(args.events, over_nats.delivered),
        raw_publishes: per_second(args.events, raw),
    })
}

/// The latency over one transport, on a fresh database (and fresh streams).
async fn measure_latency(
    backend: Backend,
    args: &Args,
    rate: u32,
    nats: Option<&NatsSettings>,
) -> BenchResult<(f64, f64)> {
    if let Some(nats) = nats {
        let context = scaleshop_events::nats::connect(nats)
            .await
            .map_err(|e| e.to_string())?;
        reset_streams(&context).await?;
    }
    let fresh = open(backend, args.tasks).await?;
    let timeout = Duration::from_secs(args.timeout_secs);
    let measured = latency(&fresh.db, nats, rate, args.latency_events, timeout).await;
    close(fresh).await?;
    measured
}

async fn run(args: Args) -> BenchResult<()> {
    let backend = match args.backend {
        BackendArg::Sqlite => Backend::Sqlite,
        BackendArg::Postgres => Backend::Postgres,
    };
    let nats = args.nats.as_deref().map(NatsSettings::new);
    let mut runs = Vec::new();
    let mut description = String::new();
    for i in 0..args.runs {
        let (mut figures, described) = one_run(backend, &args, i == 0).await?;
        if let Some(nats) = &nats {
            figures.nats = Some(measure_nats(backend, &args, nats).await?);
        }
        if let Some(rate) = args.latency_rate {
            figures.latency_db = Some(measure_latency(backend, &args, rate, None).await?);
            if let Some(nats) = &nats {
                figures.latency_nats =
                    Some(measure_latency(backend, &args, rate, Some(nats)).await?);
            }
        }
        if let Some(d) = described {
            description = d;
        }
        eprintln!(
            "bench-messaging: {:?} run {}/{}: inserts/s {:.0}, events/s {:.0}, jobs/s {:.0}",
            args.backend,
            i + 1,
            args.runs,
            figures.inserts,
            figures.events,
            figures.jobs
        );
        runs.push(figures);
    }
    report(&args, &description, &runs);
    Ok(())
}

fn report(args: &Args, description: &str, runs: &[RunFigures]) {
    let column = |f: fn(&RunFigures) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let inserts = column(|r| r.inserts);
    let appends = column(|r| r.appends);
    let events = column(|r| r.events);
    let enqueues = column(|r| r.enqueues);
    let jobs = column(|r| r.jobs);
    let drain = column(|r| r.drain);
    let events_ratio = column(|r| r.events / r.inserts);
    let drain_ratio = column(|r| r.drain / r.inserts);
    let jobs_ratio = column(|r| r.jobs / r.inserts);

    let name = match args.backend {
        BackendArg::Sqlite => "sqlite",
        BackendArg::Postgres => "postgres",
    };
    println!(
        "### messaging on {name}: {} events, {} jobs, {} runs, {} writer tasks",
        args.events, args.jobs, args.runs, args.tasks
    );
    println!();
    println!("{description}");
    println!();
    println!(
        "| run | inserts/s | appends/s | events/s | drain/s | enqueues/s | jobs/s | events/s ÷ inserts/s | drain/s ÷ inserts/s | jobs/s ÷ inserts/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, r) in runs.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} |",
            i + 1,
            r.inserts,
            r.appends,
            r.events,
            r.drain,
            r.enqueues,
            r.jobs,
            r.events / r.inserts,
            r.drain / r.inserts,
            r.jobs / r.inserts
        );
    }
    println!(
        "| **median** | **{}** | **{}** | **{}** | **{}** | **{}** | **{}** | **{}** | **{}** | **{}** |",
        show(median(&inserts), 0),
        show(median(&appends), 0),
        show(median(&events), 0),
        show(median(&drain), 0),
        show(median(&enqueues), 0),
        show(median(&jobs), 0),
        show(median(&events_ratio), 3),
        show(median(&drain_ratio), 3),
        show(median(&jobs_ratio), 3)
    );
    println!();
    println!(
        "Ratios (median of the per-run ratios; ratio of the medians in brackets): \
         events/s ÷ inserts/s = {} ({}), drain/s ÷ inserts/s = {} ({}), jobs/s ÷ inserts/s = {} ({}).",
        show(median(&events_ratio), 3),
        show(ratio(median(&events), median(&inserts)), 3),
        show(median(&drain_ratio), 3),
        show(ratio(median(&drain), median(&inserts)), 3),
        show(median(&jobs_ratio), 3),
        show(ratio(median(&jobs), median(&inserts)), 3)
    );
    if runs.iter().any(|r| r.nats.is_some()) {
        report_nats(runs);
    }
    if runs.iter().any(|r| r.latency_db.is_some()) {
        report_latency(args, runs);
    }
}

fn report_nats(runs: &[RunFigures]) {
    println!();
    println!("Over NATS ((d), (e)), beside the database transport (b) of the same run:");
    println!();
    println!(
        "| run | events/s, database | appends/s, NATS | relayed/s | events/s, NATS | raw JetStream publishes/s | NATS ÷ database | relayed ÷ raw publishes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut columns: [Vec<f64>; 7] = Default::default();
    for (i, r) in runs.iter().enumerate() {
        let Some(n) = r.nats else { continue };
        let row = [
            r.events,
            n.appends,
            n.relayed,
            n.events,
            n.raw_publishes,
            n.events / r.events,
            n.relayed / n.raw_publishes,
        ];
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} |",
            i + 1,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6]
        );
    }
    println!(
        "| **median** | **{}** | **{}** | **{}** | **{}** | **{}** | **{}** | **{}** |",
        show(median(&columns[0]), 0),
        show(median(&columns[1]), 0),
        show(median(&columns[2]), 0),
        show(median(&columns[3]), 0),
        show(median(&columns[4]), 0),
        show(median(&columns[5]), 3),
        show(median(&columns[6]), 3)
    );
}

fn report_latency(args: &Args, runs: &[RunFigures]) {
    println!();
    println!(
        "Commit to handler, {} events at {}/s (open loop), ms:",
        args.latency_events,
        args.latency_rate.unwrap_or(0)
    );
    println!();
    println!("| run | database p50 | database p99 | NATS p50 | NATS p99 |");
    println!("|---|---:|---:|---:|---:|");
    let mut columns: [Vec<f64>; 4] = Default::default();
    for (i, r) in runs.iter().enumerate() {
        let (db50, db99) = r.latency_db.unwrap_or((f64::NAN, f64::NAN));
        let (n50, n99) = r.latency_nats.unwrap_or((f64::NAN, f64::NAN));
        for (column, value) in columns.iter_mut().zip([db50, db99, n50, n99]) {
            if !value.is_nan() {
                column.push(value);
            }
        }
        println!(
            "| {} | {db50:.1} | {db99:.1} | {n50:.1} | {n99:.1} |",
            i + 1
        );
    }
    println!(
        "| **median** | **{}** | **{}** | **{}** | **{}** |",
        show(median(&columns[0]), 1),
        show(median(&columns[1]), 1),
        show(median(&columns[2]), 1),
        show(median(&columns[3]), 1)
    );
}

/// `--pg-url` reaches `scaleshop_testkit` through its environment variable. Setting
/// a variable in a running process is `unsafe` in edition 2024 (and this workspace
/// forbids unsafe code), so the process runs itself again with the variable set.
fn rerun_with_pg_url(url: &str) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("bench-messaging: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    match std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(PG_URL_VAR, url)
        .status()
    {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1).max(1)),
        Err(e) => {
            eprintln!("bench-messaging: cannot run myself again: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.backend == BackendArg::Postgres {
        let from_env = std::env::var(PG_URL_VAR).ok();
        match (&args.pg_url, &from_env) {
            // The child sees the variable equal to --pg-url, so this runs once.
            (Some(url), env) if env.as_deref() != Some(url.as_str()) => {
                return rerun_with_pg_url(url);
            }
            (None, None) => {
                eprintln!("bench-messaging: --backend postgres needs --pg-url or {PG_URL_VAR}");
                return ExitCode::FAILURE;
            }
            _ => {}
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench-messaging: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-messaging: {e}");
            ExitCode::FAILURE
        }
    }
}
