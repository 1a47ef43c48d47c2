//! Shared set-up: databases, the scripted handler, workers start/stop, bounded
//! waits and a few queries.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_db::sqlx;
use scaleshop_db::{Database, StoreError, Tx, with_pool, with_tx};
use scaleshop_jobs::{Job, JobError, JobHandler, JobQueue, NewJob, WorkerSettings, Workers};
use scaleshop_testkit::Backend;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Upper bound of every wait: a test that needs longer has failed.
pub const WAIT: Duration = Duration::from_secs(20);

/// Short settings for tests.
pub fn settings() -> WorkerSettings {
    WorkerSettings {
        poll: Duration::from_millis(50),
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        lease: Duration::from_secs(1),
        renew: Duration::from_millis(250),
        drain: Duration::from_secs(5),
    }
}

/// A fresh, migrated database with the test's tables.
pub async fn fresh(backend: Backend) -> Database {
    let db = scaleshop_testkit::fresh_database(backend, &[scaleshop_jobs::migrations()]).await;
    create_tables(&db).await;
    db
}

/// Another handle on an existing database (the same PostgreSQL database, or the
/// same SQLite file in `dir`): what a second process would open.
pub async fn open(url: Option<&str>, dir: &Path) -> Database {
    let db = scaleshop_testkit::open_database(url, dir, &[scaleshop_jobs::migrations()]).await;
    create_tables(&db).await;
    db
}

async fn create_tables(db: &Database) {
    const EFFECTS: &str = "CREATE TABLE IF NOT EXISTS job_effects (job_id TEXT NOT NULL, \
                           tag TEXT NOT NULL, attempts INTEGER NOT NULL)";
    const NOTES: &str = "CREATE TABLE IF NOT EXISTS job_dead_notes (job_id TEXT NOT NULL, \
                         state TEXT NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL)";
    const MARKS: &str = "CREATE TABLE IF NOT EXISTS marks (note TEXT NOT NULL)";
    for q in [EFFECTS, NOTES, MARKS] {
        with_pool!(db, pool => {
            sqlx::query(q).execute(pool).await.expect(q);
        });
    }
}

pub use scaleshop_testkit::eventually_within;

pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(WAIT, what, check).await;
}

/// Waits (bounded) until the job is in `state`; returns it.
pub async fn wait_for_state(db: &Database, id: Uuid, state: &str) -> Job {
    let queue = JobQueue::new(db.clone());
    eventually(&format!("job {id} {state}"), async || {
        queue
            .get(id)
            .await
            .unwrap()
            .is_some_and(|job| job.state == state)
    })
    .await;
    queue.get(id).await.unwrap().unwrap()
}

pub async fn get(db: &Database, id: Uuid) -> Option<Job> {
    JobQueue::new(db.clone()).get(id).await.unwrap()
}

pub async fn enqueue(db: &Database, job: NewJob) -> Uuid {
    JobQueue::new(db.clone())
        .enqueue(&job)
        .await
        .expect("enqueue")
}

/// (lease owner, lease until) of a job.
pub async fn job_lease(db: &Database, id: Uuid) -> (Option<String>, Option<DateTime<Utc>>) {
    const Q: &str = "SELECT lease_owner, lease_until FROM jobs WHERE id = $1";
    with_pool!(db, pool => sqlx::query_as(Q).bind(id).fetch_one(pool).await.expect("lease"))
}

/// Effect rows of a job: (tag, attempts seen by the run).
pub async fn effects(db: &Database, id: Uuid) -> Vec<(String, i32)> {
    const Q: &str = "SELECT tag, attempts FROM job_effects WHERE job_id = $1";
    with_pool!(db, pool => {
        sqlx::query_as(Q).bind(id.to_string()).fetch_all(pool).await.expect("effects")
    })
}

pub async fn effect_count(db: &Database) -> i64 {
    const Q: &str = "SELECT COUNT(*) FROM job_effects";
    with_pool!(db, pool => sqlx::query_scalar(Q).fetch_one(pool).await.expect("count"))
}

/// `on_dead` rows of a job: (state, error, attempts) as the dead transaction saw
/// the job.
pub async fn dead_notes(db: &Database, id: Uuid) -> Vec<(String, String, i32)> {
    const Q: &str = "SELECT state, error, attempts FROM job_dead_notes WHERE job_id = $1";
    with_pool!(db, pool => {
        sqlx::query_as(Q).bind(id.to_string()).fetch_all(pool).await.expect("notes")
    })
}

/// Running workers and their shutdown switch.
pub struct Running {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

pub fn start(
    db: &Database,
    settings: WorkerSettings,
    queues: &[(&'static str, usize, Arc<Probe>)],
) -> Running {
    let (stop, shutdown) = watch::channel(false);
    let mut workers = Workers::new(db.clone(), settings);
    for (queue, concurrency, handler) in queues {
        workers.register(queue, *concurrency, handler.clone());
    }
    Running {
        stop,
        handle: workers.start(shutdown),
    }
}

impl Running {
    /// Asks the workers to stop and waits (bounded) until they have drained.
    pub async fn stop(self) {
        self.signal();
        self.join().await;
    }

    /// Asks the workers to stop.
    pub fn signal(&self) {
        self.stop.send(true).expect("workers still listening");
    }

    /// Waits (bounded) until the workers have stopped.
    pub async fn join(self) {
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("workers stop in time")
            .expect("workers task joins");
    }
}

/// What one run does.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Sleeps this long, writes its effect, succeeds.
    Succeed(Duration),
    /// Waits until the gate opens, then as `Succeed`.
    AfterGate(Arc<AtomicBool>, Duration),
    Retry(String),
    Permanent(String),
    /// Fails as if the database could not be reached.
    Unavailable(String),
    /// Never returns.
    Hang,
    Panic,
}

/// Decides a run's plan from the job and how many runs of it came before.
pub type Script = Box<dyn Fn(&Job, usize) -> Plan + Send + Sync>;

/// One run of a handler.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: Uuid,
    pub attempts: i32,
    pub started: DateTime<Utc>,
}

/// The test handler: follows its script; a success writes `(job id, tag,
/// attempts)` into `job_effects`; `on_dead` notes the job row as its transaction
/// sees it (state, error, attempts) into `job_dead_notes`, and fails once after
/// writing when `fail_on_dead_once` is set.
pub struct Probe {
    db: Database,
    tag: &'static str,
    script: Script,
    runs: Mutex<Vec<Run>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    finished: AtomicUsize,
    fail_on_dead_once: AtomicBool,
}

impl Probe {
    pub fn new(db: &Database, tag: &'static str) -> Self {
        Self {
            db: db.clone(),
            tag,
            script: Box::new(|_, _| Plan::Succeed(Duration::ZERO)),
            runs: Mutex::default(),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            fail_on_dead_once: AtomicBool::new(false),
        }
    }

    pub fn script(mut self, script: impl Fn(&Job, usize) -> Plan + Send + Sync + 'static) -> Self {
        self.script = Box::new(script);
        self
    }

    pub fn fail_on_dead_once(self) -> Self {
        self.fail_on_dead_once.store(true, Ordering::SeqCst);
        self
    }

    pub fn build(self) -> Arc<Self> {
        Arc::new(self)
    }

    pub async fn runs(&self) -> Vec<Run> {
        self.runs.lock().await.clone()
    }

    pub async fn runs_of(&self, id: Uuid) -> Vec<Run> {
        self.runs
            .lock()
            .await
            .iter()
            .filter(|r| r.id == id)
            .cloned()
            .collect()
    }

    pub fn max_running(&self) -> usize {
        self.max_running.load(Ordering::SeqCst)
    }

    /// Runs that returned (either way).
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

struct Finished<'a>(&'a Probe);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl JobHandler for Probe {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        const Q: &str = "INSERT INTO job_effects (job_id, tag, attempts) VALUES ($1, $2, $3)";
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let _finished = Finished(self);
        let prior = {
            let mut runs = self.runs.lock().await;
            let prior = runs.iter().filter(|r| r.id == job.id).count();
            runs.push(Run {
                id: job.id,
                attempts: job.attempts,
                started: Utc::now(),
            });
            prior
        };
        let mut plan = (self.script)(job, prior);
        if let Plan::AfterGate(gate, pause) = plan {
            while !gate.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            plan = Plan::Succeed(pause);
        }
        match plan {
            Plan::AfterGate(..) => unreachable!("handled above"),
            Plan::Succeed(pause) => {
                tokio::time::sleep(pause).await;
                with_pool!(self.db, pool => {
                    sqlx::query(Q).bind(job.id.to_string()).bind(self.tag).bind(job.attempts)
                        .execute(pool).await.map_err(|e| JobError::retry(e.to_string()))?;
                });
                Ok(())
            }
            Plan::Retry(message) => Err(JobError::retry(message)),
            Plan::Permanent(message) => Err(JobError::permanent(message)),
            Plan::Unavailable(message) => Err(JobError::unavailable(message)),
            Plan::Hang => std::future::pending().await,
            Plan::Panic => panic!("test handler panics on job {}", job.id),
        }
    }

    async fn on_dead(&self, job: &Job, tx: &mut Tx) -> Result<(), StoreError> {
        // Notes the job as the dead transaction sees it.
        const Q: &str = "INSERT INTO job_dead_notes (job_id, state, error, attempts) \
                         SELECT $1, state, COALESCE(last_error, ''), attempts FROM jobs WHERE id = $2";
        with_tx!(tx, conn => {
            sqlx::query(Q).bind(job.id.to_string()).bind(job.id).execute(conn).await?;
        });
        if self.fail_on_dead_once.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Other("on_dead fails once".into()));
        }
        Ok(())
    }
}

pub use scaleshop_testkit::Crashable;

/// Starts workers for `queue` on a runtime standing for another process (with its
/// own database handle) whose handler never returns: crash the runtime and their
/// jobs are left `running` under their lease. Returns the runtime and the handler.
pub async fn start_hung_workers(
    db: &Database,
    (url, dir): (Option<String>, std::path::PathBuf),
    settings: WorkerSettings,
    (queue, concurrency): (&'static str, usize),
) -> (Crashable, Arc<Probe>) {
    let crashing = Crashable::new();
    let hung = Probe::new(db, "crashed").script(|_, _| Plan::Hang).build();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let handler = hung.clone();
    crashing
        .handle()
        .spawn(async move {
            let db = open(url.as_deref(), &dir).await;
            let mut workers = Workers::new(db, settings);
            workers.register(queue, concurrency, handler);
            // The handle is dropped: the loops run on until the runtime is dropped.
            drop(workers.start(shutdown));
            std::mem::forget(stop);
        })
        .await
        .expect("hung workers started");
    (crashing, hung)
}
