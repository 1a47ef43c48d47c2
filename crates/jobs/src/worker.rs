//! Workers: one loop per queue claims due jobs up to the queue's free concurrency,
//! runs each under a renewed lease, and records the outcome. Wakes on enqueue (the
//! commit signal), when a job finishes, when the next delayed job is due, and on a
//! short poll (which also finds jobs whose worker died: their lease expired).
//!
//! What counts as an attempt: every run that was started (a claim), including one
//! cut short by the death of its worker (so a job that kills its process every
//! time still ends `dead`). A failure's backoff grows with the failures the job
//! itself reported, not with interrupted runs. A failure because the database could
//! not be reached ([`JobError::unavailable`]) says nothing about the job: it is not
//! counted, and the job runs again after the shortest backoff.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scaleshop_db::clock::{after, backoff, now};
use scaleshop_db::sqlx;
use scaleshop_db::{Backend, Database, StoreError, Topic, Tx, with_pool, with_tx};
use scaleshop_telemetry::{Collector, Heartbeat, names};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::{Job, STATES};

/// Why a run failed. A retryable failure runs again after a backoff while attempts
/// remain; a permanent one goes to `dead` at once.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub message: String,
    pub permanent: bool,
    /// The database could not be reached: not the job's fault, not an attempt.
    pub unavailable: bool,
}

impl JobError {
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            unavailable: false,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
            unavailable: false,
        }
    }

    /// The database (or another part of the platform) could not be reached: run
    /// again soon, without counting the attempt.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            unavailable: true,
        }
    }
}

impl From<StoreError> for JobError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable => Self::unavailable(error.to_string()),
            other => Self::retry(other.to_string()),
        }
    }
}

/// What a queue does with its jobs. `run` may be called more than once for one job
/// (a worker can die after the effect and before recording it): make it idempotent.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    async fn run(&self, job: &Job) -> Result<(), JobError>;

    /// Runs in the transaction that marks the job `dead` (to record the failure in
    /// the owner's tables).
    async fn on_dead(&self, _job: &Job, _tx: &mut Tx) -> Result<(), StoreError> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// How long a claim holds a job without renewal: a dead worker's job runs
    /// again this long after its last renewal.
    pub lease: Duration,
    /// How often a running job's lease is renewed (well inside `lease`).
    pub renew: Duration,
    pub poll: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long shutdown waits for running jobs.
    pub drain: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(4),
            renew: Duration::from_secs(1),
            poll: Duration::from_secs(1),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            drain: Duration::from_secs(20),
        }
    }
}

struct Queue {
    name: &'static str,
    concurrency: usize,
    handler: Arc<dyn JobHandler>,
}

/// The workers of one process. Register queues, then [`start`](Workers::start).
pub struct Workers {
    db: Database,
    queues: Vec<Queue>,
    settings: WorkerSettings,
    owner: String,
    heartbeat: Heartbeat,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field(
                "queues",
                &self
                    .queues
                    .iter()
                    .map(|q| (q.name, q.concurrency))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Workers {
    pub fn new(db: Database, settings: WorkerSettings) -> Self {
        Self {
            db,
            queues: Vec::new(),
            settings,
            owner: format!("{}-{}", std::process::id(), Uuid::now_v7().simple()),
            heartbeat: Heartbeat::default(),
        }
    }

    /// Serves `queue` with at most `concurrency` jobs running at once in this process.
    pub fn register(
        &mut self,
        queue: &'static str,
        concurrency: usize,
        handler: Arc<dyn JobHandler>,
    ) {
        self.queues.push(Queue {
            name: queue,
            concurrency: concurrency.max(1),
            handler,
        });
    }

    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// The `jobs{queue,state}` gauge, computed when scraped.
    pub fn collector(&self) -> Collector {
        let db = self.db.clone();
        let queues: Vec<&'static str> = self.queues.iter().map(|q| q.name).collect();
        Arc::new(move || {
            let db = db.clone();
            let queues = queues.clone();
            Box::pin(async move {
                const Q: &str = "SELECT queue, state, COUNT(*) FROM jobs GROUP BY queue, state";
                let counts: Result<Vec<(String, String, i64)>, sqlx::Error> =
                    with_pool!(db, pool => sqlx::query_as(Q).fetch_all(pool).await);
                let Ok(counts) = counts else { return };
                for queue in &queues {
                    for state in STATES {
                        let n = counts
                            .iter()
                            .find(|(q, s, _)| q == queue && s == state)
                            .map_or(0, |(.., n)| *n);
                        metrics::gauge!(names::JOBS, "queue" => *queue, "state" => state)
                            .set(n as f64);
                    }
                }
            })
        })
    }

    /// Starts one loop per queue. The handle ends when every loop has stopped after
    /// `shutdown` turned true and its running jobs finished (or the drain time ran out).
    pub fn start(self, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let mut tasks = Vec::new();
        for queue in self.queues {
            let runner = Arc::new(QueueRunner {
                db: self.db.clone(),
                settings: self.settings.clone(),
                owner: self.owner.clone(),
                name: queue.name,
                concurrency: queue.concurrency,
                handler: queue.handler,
                heartbeat: self.heartbeat.clone(),
            });
            tasks.push(tokio::spawn(runner.run(shutdown.clone())));
        }
        self.heartbeat.beat();
        tokio::spawn(async move {
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}

struct QueueRunner {
    db: Database,
    settings: WorkerSettings,
    owner: String,
    name: &'static str,
    concurrency: usize,
    handler: Arc<dyn JobHandler>,
    heartbeat: Heartbeat,
}

const CLAIM_POSTGRES: &str = "UPDATE jobs SET state = 'running', attempts = attempts + 1, \
    interrupted = interrupted + CASE WHEN state = 'running' THEN 1 ELSE 0 END, lease_owner = $2, \
    lease_until = $3, updated_at = $4 WHERE id IN (SELECT id FROM jobs WHERE queue = $1 AND \
    ((state IN ('scheduled', 'failed') AND run_at <= $4) OR (state = 'running' AND lease_until < $4)) \
    ORDER BY run_at LIMIT $5 FOR UPDATE SKIP LOCKED) \
    RETURNING id, queue, payload, state, attempts, max_attempts, last_error, run_at, created_at, updated_at, \
    traceparent";

// One statement: SQLite takes the write lock for it, so claims never overlap.
const CLAIM_SQLITE: &str = "UPDATE jobs SET state = 'running', attempts = attempts + 1, \
    interrupted = interrupted + CASE WHEN state = 'running' THEN 1 ELSE 0 END, lease_owner = $2, \
    lease_until = $3, updated_at = $4 WHERE id IN (SELECT id FROM jobs WHERE queue = $1 AND \
    ((state IN ('scheduled', 'failed') AND run_at <= $4) OR (state = 'running' AND lease_until < $4)) \
    ORDER BY run_at LIMIT $5) \
    RETURNING id, queue, payload, state, attempts, max_attempts, last_error, run_at, created_at, updated_at, \
    traceparent";

impl QueueRunner {
    async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let finished = Arc::new(Notify::new());
        let signal = self.db.commit_signal(Topic::Jobs);
        while !*shutdown.borrow() {
            self.heartbeat.beat();
            let committed = signal.notified();
            tokio::pin!(committed);
            committed.as_mut().enable();
            let mut wait = self.settings.poll;
            let free = permits.available_permits();
            if free > 0 {
                match self.claim(free).await {
                    Ok(jobs) if !jobs.is_empty() => {
                        // Fewer than asked for: every job due now is taken, so
                        // wait for the next one rather than claim again.
                        let took_all_due = jobs.len() < free;
                        for job in jobs {
                            match permits.clone().try_acquire_owned() {
                                Ok(permit) => {
                                    tokio::spawn(self.clone().execute(
                                        job,
                                        permit,
                                        finished.clone(),
                                    ));
                                }
                                // Cannot happen (we claimed at most `free`); the lease
                                // brings the job back if it ever does.
                                Err(_) => {
                                    tracing::error!(queue = self.name, job_id = %job.id, "claimed without a permit")
                                }
                            }
                        }
                        self.heartbeat.beat();
                        if !took_all_due {
                            continue;
                        }
                        wait = self.until_next_due().await;
                    }
                    Ok(_) => wait = self.until_next_due().await,
                    Err(e) => {
                        tracing::warn!(queue = self.name, error = %e, "claiming jobs failed");
                        wait = Duration::from_secs(1);
                    }
                }
            }
            // Waiting is not being stuck: alive until the next turn, however long.
            self.heartbeat.park();
            tokio::select! {
                () = &mut committed => {}
                () = finished.notified() => {}
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        // Drain: let running jobs finish.
        let all = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        if tokio::time::timeout(self.settings.drain, permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                queue = self.name,
                "jobs still running at shutdown; they run again when their lease expires"
            );
        }
    }

    async fn claim(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let sql = match self.db.backend() {
            Backend::Postgres => CLAIM_POSTGRES,
            Backend::Sqlite => CLAIM_SQLITE,
        };
        let at = now();
        Ok(with_pool!(self.db, pool => {
            sqlx::query_as(sql)
                .bind(self.name)
                .bind(&self.owner)
                .bind(after(self.settings.lease))
                .bind(at)
                .bind(limit)
                .fetch_all(pool)
                .await?
        }))
    }

    /// How long until the next job is due (at most the safety-net poll).
    async fn until_next_due(&self) -> Duration {
        match self.next_due().await {
            Ok(Some(due)) => (due - now())
                .to_std()
                .unwrap_or_default()
                .min(self.settings.poll),
            _ => self.settings.poll,
        }
    }

    async fn next_due(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
        // A job waiting for its time, or one whose worker may have died (claimable
        // when its lease runs out).
        const Q: &str = "SELECT MIN(due) FROM (\
            SELECT MIN(run_at) AS due FROM jobs WHERE queue = $1 AND state IN ('scheduled', 'failed') \
            UNION ALL SELECT MIN(lease_until) FROM jobs WHERE queue = $1 AND state = 'running') AS next";
        Ok(
            with_pool!(self.db, pool => sqlx::query_scalar(Q).bind(self.name).fetch_one(pool).await?),
        )
    }

    async fn execute(
        self: Arc<Self>,
        job: Job,
        permit: OwnedSemaphorePermit,
        finished: Arc<Notify>,
    ) {
        let _permit = permit;
        let outcome = if job.attempts > job.max_attempts {
            // Earlier attempts died with their worker (the lease expired each time).
            Err(JobError::permanent(
                "no attempts left: the worker running it stopped",
            ))
        } else {
            let renew = tokio::spawn(self.clone().renew_lease(job.id));
            let handler = self.handler.clone();
            let running = job.clone();
            // Its own task, so a panicking handler fails the job, not the worker.
            let span = run_span(self.name, &job);
            let result =
                tokio::spawn(async move { handler.run(&running).await }.instrument(span)).await;
            renew.abort();
            match result {
                Ok(result) => result,
                Err(e) if e.is_panic() => Err(JobError::retry("the handler panicked")),
                Err(e) => Err(JobError::retry(e.to_string())),
            }
        };
        let recorded = match outcome {
            Ok(()) => self.completed(&job).await,
            Err(error) => self.failed(&job, &error).await,
        };
        if let Err(e) = recorded {
            tracing::warn!(queue = self.name, job_id = %job.id, error = %e, "job outcome not recorded; it runs again when its lease expires");
        }
        drop(_permit);
        finished.notify_one();
    }

    async fn renew_lease(self: Arc<Self>, id: Uuid) {
        const Q: &str = "UPDATE jobs SET lease_until = $3 WHERE id = $1 AND lease_owner = $2 AND state = 'running'";
        let every = self.settings.renew.min(self.settings.lease / 2);
        loop {
            tokio::time::sleep(every).await;
            let renewed = with_pool!(self.db, pool => {
                sqlx::query(Q).bind(id).bind(&self.owner).bind(after(self.settings.lease)).execute(pool).await
                    .map(|r| r.rows_affected())
            });
            if let Err(e) = renewed {
                tracing::warn!(queue = self.name, job_id = %id, error = %e, "lease renewal failed");
            }
        }
    }

    async fn completed(&self, job: &Job) -> Result<(), StoreError> {
        const Q: &str = "UPDATE jobs SET state = 'completed', lease_owner = NULL, lease_until = NULL, \
                         last_error = NULL, updated_at = $3 WHERE id = $1 AND lease_owner = $2 AND state = 'running'";
        let done = with_pool!(self.db, pool => {
            sqlx::query(Q).bind(job.id).bind(&self.owner).bind(now()).execute(pool).await?.rows_affected()
        });
        if done == 1 {
            metrics::counter!(names::JOB_RUNS, "queue" => self.name, "outcome" => "completed")
                .increment(1);
        } else {
            tracing::warn!(queue = self.name, job_id = %job.id, "lease lost before completion was recorded");
        }
        Ok(())
    }

    async fn failed(&self, job: &Job, error: &JobError) -> Result<(), StoreError> {
        if error.unavailable {
            return self.not_counted(job, error).await;
        }
        if error.permanent || job.attempts >= job.max_attempts {
            const DEAD: &str = "UPDATE jobs SET state = 'dead', last_error = $3, lease_owner = NULL, \
                                lease_until = NULL, updated_at = $4 \
                                WHERE id = $1 AND lease_owner = $2 AND state = 'running'";
            let mut tx = self.db.begin().await?;
            let done = with_tx!(&mut tx, conn => {
                sqlx::query(DEAD).bind(job.id).bind(&self.owner).bind(&error.message).bind(now())
                    .execute(conn).await?.rows_affected()
            });
            if done != 1 {
                tx.rollback().await?;
                return Ok(());
            }
            self.handler.on_dead(job, &mut tx).await?;
            tx.commit().await?;
            metrics::counter!(names::JOB_RUNS, "queue" => self.name, "outcome" => "dead")
                .increment(1);
            tracing::warn!(queue = self.name, job_id = %job.id, attempts = job.attempts, error = %error, "job is dead");
            return Ok(());
        }
        // The backoff follows the job's own failures, not the runs its workers'
        // deaths cut short.
        const INTERRUPTED: &str = "SELECT interrupted FROM jobs WHERE id = $1";
        let interrupted: i32 = with_pool!(self.db, pool => {
            sqlx::query_scalar(INTERRUPTED).bind(job.id).fetch_optional(pool).await?
        })
        .unwrap_or(0);
        let attempt = u32::try_from(job.attempts - interrupted)
            .unwrap_or(1)
            .max(1);
        let retry_at = after(backoff(
            self.settings.min_backoff,
            self.settings.max_backoff,
            attempt,
        ));
        const RETRY: &str = "UPDATE jobs SET state = 'failed', run_at = $3, last_error = $4, lease_owner = NULL, \
                             lease_until = NULL, updated_at = $5 WHERE id = $1 AND lease_owner = $2 AND state = 'running'";
        with_pool!(self.db, pool => {
            sqlx::query(RETRY).bind(job.id).bind(&self.owner).bind(retry_at).bind(&error.message).bind(now())
                .execute(pool).await?;
        });
        metrics::counter!(names::JOB_RUNS, "queue" => self.name, "outcome" => "retried")
            .increment(1);
        tracing::info!(queue = self.name, job_id = %job.id, attempts = job.attempts, error = %error, %retry_at, "job failed; will retry");
        Ok(())
    }

    /// A run that failed because the database could not be reached: given back (not
    /// an attempt) and run again after the shortest backoff.
    async fn not_counted(&self, job: &Job, error: &JobError) -> Result<(), StoreError> {
        let retry_at = after(backoff(
            self.settings.min_backoff,
            self.settings.max_backoff,
            1,
        ));
        const RETRY: &str = "UPDATE jobs SET state = 'failed', attempts = attempts - 1, run_at = $3, \
                             last_error = $4, lease_owner = NULL, lease_until = NULL, updated_at = $5 \
                             WHERE id = $1 AND lease_owner = $2 AND state = 'running'";
        with_pool!(self.db, pool => {
            sqlx::query(RETRY).bind(job.id).bind(&self.owner).bind(retry_at).bind(&error.message).bind(now())
                .execute(pool).await?;
        });
        metrics::counter!(names::JOB_RUNS, "queue" => self.name, "outcome" => "retried")
            .increment(1);
        tracing::info!(queue = self.name, job_id = %job.id, error = %error, %retry_at, "job could not reach the database; will run again (not counted)");
        Ok(())
    }
}

/// The span of one run of a job: a child of the span that enqueued it, so a
/// job is part of the trace of what asked for it (an order's saga, its email).
fn run_span(queue: &'static str, job: &Job) -> tracing::Span {
    let span = tracing::info_span!(
        "job",
        queue,
        job_id = %job.id,
        attempt = job.attempts,
        trace_id = tracing::field::Empty,
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
    );
    if scaleshop_telemetry::trace::enabled() {
        span.record("otel.kind", "consumer");
        span.record("otel.name", format!("job {queue}"));
        scaleshop_telemetry::trace::adopt(&span, job.traceparent.as_deref());
    }
    span
}

/// Makes every running job claimable at once, as if its lease had run out. Only
/// for a process that knows no other worker is alive (the embedded data folder's
/// lock): their workers died with the previous process. The next claim counts the
/// interrupted run as an attempt, as a lease expiry would. Returns how many.
pub async fn expire_all_leases(db: &Database) -> Result<u64, StoreError> {
    const Q: &str = "UPDATE jobs SET lease_until = $1 WHERE state = 'running'";
    let past = now() - chrono::Duration::seconds(1);
    let mut tx = db.begin().await?;
    tx.wake_on_commit(Topic::Jobs);
    let expired = with_tx!(&mut tx, conn => {
        sqlx::query(Q).bind(past).execute(conn).await?.rows_affected()
    });
    tx.commit().await?;
    Ok(expired)
}
