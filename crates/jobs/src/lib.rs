//! The job queue (Bull's features, durable in the database): named queues, enqueue
//! inside the caller's transaction, per-queue concurrency, attempts with
//! exponential backoff and jitter, delayed jobs, a lease so a crashed worker's job
//! runs again, `dead` after the last attempt, redrive, and a shutdown that lets
//! running jobs finish.
//!
//! States: `scheduled` (waiting for `run_at`) -> `running` (leased) -> `completed`;
//! or -> `failed` (an attempt failed; it runs again at `run_at`) -> ... -> `dead`
//! (no attempts left). Redrive moves `dead` or `failed` back to `scheduled`.
//!
//! Claims use `FOR UPDATE SKIP LOCKED` on PostgreSQL (many workers, many
//! processes) and an immediate transaction on SQLite. This crate knows nothing of
//! what a job does: handlers are registered by the services.

use chrono::{DateTime, Utc};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::types::Json;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Database, Migrations, StoreError, Topic, Tx, with_pool, with_tx};
use serde::Serialize;
use uuid::Uuid;

pub mod http;
pub mod worker;

pub use worker::{JobError, JobHandler, WorkerSettings, Workers};

/// Attempts of a job unless its enqueuer says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Every state a job can be in.
pub const STATES: [&str; 5] = ["scheduled", "running", "completed", "failed", "dead"];

/// The tables this crate owns.
pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "jobs",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub queue: &'static str,
    pub payload: serde_json::Value,
    /// Not before this time (a delayed job); `None` = now.
    pub run_at: Option<DateTime<Utc>>,
    /// `None` = [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: Option<u32>,
}

impl NewJob {
    pub fn new(queue: &'static str, payload: serde_json::Value) -> Self {
        Self {
            queue,
            payload,
            run_at: None,
            max_attempts: None,
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, FromRow)]
pub struct Job {
    pub id: Uuid,
    pub queue: String,
    pub payload: Json<serde_json::Value>,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The trace of the span that enqueued it (W3C `traceparent`), when traces
    /// are on: its runs are spans of that trace.
    pub traceparent: Option<String>,
}

/// A job as the admin API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: Uuid,
    pub queue: String,
    /// `scheduled`, `running`, `completed`, `failed` or `dead`.
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        Self {
            id: job.id,
            queue: job.queue,
            state: job.state,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            last_error: job.last_error,
            run_at: job.run_at,
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}

pub(crate) const COLUMNS: &str = "id, queue, payload, state, attempts, max_attempts, last_error, run_at, \
                                  created_at, updated_at, traceparent";

/// Enqueues inside the caller's transaction: the job exists if and only if the
/// caller's change commits. Wakes workers in every process at commit.
pub async fn enqueue(tx: &mut Tx, job: &NewJob) -> Result<Uuid, StoreError> {
    const INSERT: &str = "INSERT INTO jobs (id, queue, payload, state, attempts, max_attempts, run_at, \
                          created_at, updated_at, traceparent) VALUES ($1, $2, $3, 'scheduled', 0, $4, $5, $6, $6, $7)";
    let id = Uuid::now_v7();
    let created = now();
    let max_attempts =
        i32::try_from(job.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1)).unwrap_or(i32::MAX);
    tx.wake_everywhere_on_commit(Topic::Jobs).await?;
    with_tx!(tx, conn => {
        sqlx::query(INSERT)
            .bind(id)
            .bind(job.queue)
            .bind(Json(&job.payload))
            .bind(max_attempts)
            .bind(job.run_at.unwrap_or(created))
            .bind(created)
            .bind(scaleshop_telemetry::trace::current_traceparent())
            .execute(conn)
            .await?;
    });
    Ok(id)
}

/// What a redrive found.
#[derive(Debug)]
pub enum Redrive {
    Scheduled(Job),
    /// The job is in a state that cannot be retried.
    NotRetryable(Job),
    Missing,
}

/// Admin access to the queue.
#[derive(Debug, Clone)]
pub struct JobQueue {
    db: Database,
}

impl JobQueue {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Enqueues in a transaction of its own.
    pub async fn enqueue(&self, job: &NewJob) -> Result<Uuid, StoreError> {
        let mut tx = self.db.begin().await?;
        let id = enqueue(&mut tx, job).await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        const Q: &str = "SELECT id, queue, payload, state, attempts, max_attempts, last_error, run_at, \
                         created_at, updated_at, traceparent FROM jobs WHERE id = $1";
        debug_assert!(Q.contains(COLUMNS));
        Ok(with_pool!(self.db, pool => sqlx::query_as(Q).bind(id).fetch_optional(pool).await?))
    }

    /// Jobs by id (creation order), filtered.
    pub async fn list(
        &self,
        queue: Option<&str>,
        state: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Job>, StoreError> {
        const Q: &str = "SELECT id, queue, payload, state, attempts, max_attempts, last_error, run_at, \
                         created_at, updated_at, traceparent FROM jobs WHERE ($1 IS NULL OR queue = $1) \
                         AND ($2 IS NULL OR state = $2) AND ($3 IS NULL OR id > $3) ORDER BY id LIMIT $4";
        Ok(with_pool!(self.db, pool => {
            sqlx::query_as(Q).bind(queue).bind(state).bind(after).bind(limit).fetch_all(pool).await?
        }))
    }

    /// Moves a `dead` or `failed` job back to `scheduled`, due now, with a fresh set
    /// of attempts. Returns the job as the redrive left it.
    pub async fn retry(&self, id: Uuid) -> Result<Redrive, StoreError> {
        const Q: &str = "UPDATE jobs SET state = 'scheduled', attempts = 0, run_at = $2, updated_at = $2, \
                         lease_owner = NULL, lease_until = NULL WHERE id = $1 AND state IN ('dead', 'failed') \
                         RETURNING id, queue, payload, state, attempts, max_attempts, last_error, run_at, \
                         created_at, updated_at, traceparent";
        let mut tx = self.db.begin().await?;
        tx.wake_everywhere_on_commit(Topic::Jobs).await?;
        let job: Option<Job> = with_tx!(&mut tx, conn => {
            sqlx::query_as(Q).bind(id).bind(now()).fetch_optional(conn).await?
        });
        tx.commit().await?;
        Ok(match job {
            Some(job) => Redrive::Scheduled(job),
            None => match self.get(id).await? {
                Some(job) => Redrive::NotRetryable(job),
                None => Redrive::Missing,
            },
        })
    }
}
