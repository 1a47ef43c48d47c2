//! Shared set-up: databases, the recording consumer, dispatcher start/stop, bounded
//! waits and a few queries.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_db::sqlx;
use scaleshop_db::{Database, Tx, with_pool, with_tx};
use scaleshop_events::{
    Consumer, Dispatcher, DispatcherSettings, Event, EventLog, HandlerError, NewEvent,
};
use scaleshop_testkit::Backend;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Upper bound of every wait: a test that needs longer has failed.
pub const WAIT: Duration = Duration::from_secs(20);

/// Short settings for tests.
pub fn settings() -> DispatcherSettings {
    DispatcherSettings {
        max_attempts: 3,
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        lease: Duration::from_secs(1),
        poll: Duration::from_millis(50),
        ..DispatcherSettings::default()
    }
}

/// A fresh, migrated database with the test's `effects` table.
pub async fn fresh(backend: Backend) -> Database {
    let db = scaleshop_testkit::fresh_database(backend, &[scaleshop_events::migrations()]).await;
    create_effects(&db).await;
    db
}

/// Another handle on an existing database (the same PostgreSQL database, or the
/// same SQLite file in `dir`): what a second process would open.
pub async fn open(url: Option<&str>, dir: &Path) -> Database {
    let db = scaleshop_testkit::open_database(url, dir, &[scaleshop_events::migrations()]).await;
    create_effects(&db).await;
    db
}

pub async fn create_effects(db: &Database) {
    const Q: &str = "CREATE TABLE IF NOT EXISTS effects (consumer TEXT NOT NULL, \
                     event_id TEXT NOT NULL, sequence BIGINT NOT NULL, tag TEXT NOT NULL)";
    with_pool!(db, pool => {
        sqlx::query(Q).execute(pool).await.expect("create effects");
    });
}

/// Runs a statement without parameters.
pub async fn exec(db: &Database, sql: &'static str) {
    with_pool!(db, pool => {
        sqlx::query(sql).execute(pool).await.expect(sql);
    });
}

pub use scaleshop_testkit::eventually_within;

pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(WAIT, what, check).await;
}

/// Appends events of these types in one transaction; returns (id, sequence) each.
pub async fn append_in_one_tx(db: &Database, kinds: &[&'static str]) -> Vec<(Uuid, i64)> {
    let mut tx = db.begin().await.expect("begin");
    let mut appended = Vec::new();
    for kind in kinds {
        let event = NewEvent::raw(kind, 1, Uuid::now_v7(), serde_json::json!({ "kind": kind }));
        let sequence = scaleshop_events::append(&mut tx, &event)
            .await
            .expect("append");
        appended.push((event.id, sequence));
    }
    tx.commit().await.expect("commit");
    appended
}

pub async fn append_one(db: &Database, kind: &'static str) -> (Uuid, i64) {
    append_in_one_tx(db, &[kind]).await[0]
}

/// A running dispatcher and its shutdown switch.
pub struct Running {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

pub async fn start(
    db: &Database,
    settings: DispatcherSettings,
    consumers: &[Arc<Recorder>],
) -> Running {
    let consumers = consumers
        .iter()
        .map(|c| c.clone() as Arc<dyn Consumer>)
        .collect();
    start_consumers(db, settings, consumers).await
}

/// Starts a dispatcher with any consumers.
pub async fn start_consumers(
    db: &Database,
    settings: DispatcherSettings,
    consumers: Vec<Arc<dyn Consumer>>,
) -> Running {
    let mut dispatcher = Dispatcher::new(db.clone(), settings);
    for consumer in consumers {
        dispatcher.subscribe(consumer);
    }
    start_dispatcher(dispatcher).await
}

/// Starts a dispatcher built by the test.
pub async fn start_dispatcher(dispatcher: Dispatcher) -> Running {
    let (stop, shutdown) = watch::channel(false);
    let handle = dispatcher.start(shutdown).await.expect("start dispatcher");
    Running { stop, handle }
}

impl Running {
    /// Asks the loops to stop and waits (bounded) until they have.
    pub async fn stop(self) {
        // An error only means every loop has already ended.
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("dispatcher stops in time")
            .expect("dispatcher task joins");
    }
}

/// Counts handlers running at once (across consumers sharing it).
#[derive(Debug, Default)]
pub struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One call of a handler.
#[derive(Debug, Clone)]
pub struct Call {
    pub sequence: i64,
    pub event_id: Uuid,
    pub kind: String,
    pub at: DateTime<Utc>,
}

/// Decides whether a call fails: gets the event and how many calls for this event
/// came before; `Some(message)` fails it.
pub type FailRule = Box<dyn Fn(&Event, usize) -> Option<String> + Send + Sync>;

/// Decides whether a call panics (same arguments as [`FailRule`]).
pub type PanicRule = Box<dyn Fn(&Event, usize) -> bool + Send + Sync>;

/// The test consumer: writes `(consumer, event id, sequence, tag)` into `effects`
/// in the delivery transaction, then fails if its rule says so (so a failed
/// attempt's effect must be rolled back).
pub struct Recorder {
    name: &'static str,
    tag: &'static str,
    kinds: Option<Vec<&'static str>>,
    fail: FailRule,
    panic: PanicRule,
    pause: Duration,
    in_flight: Arc<InFlight>,
    calls: Mutex<Vec<Call>>,
}

impl Recorder {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            tag: "",
            kinds: None,
            fail: Box::new(|_, _| None),
            panic: Box::new(|_, _| false),
            pause: Duration::ZERO,
            in_flight: Arc::default(),
            calls: Mutex::default(),
        }
    }

    /// Recorded with each effect row (which instance handled the event).
    pub fn tag(mut self, tag: &'static str) -> Self {
        self.tag = tag;
        self
    }

    pub fn wants_only(mut self, kinds: &[&'static str]) -> Self {
        self.kinds = Some(kinds.to_vec());
        self
    }

    pub fn failing(
        mut self,
        rule: impl Fn(&Event, usize) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.fail = Box::new(rule);
        self
    }

    /// Panics (after writing its effect) when the rule says so.
    pub fn panicking(
        mut self,
        rule: impl Fn(&Event, usize) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.panic = Box::new(rule);
        self
    }

    /// Sleeps this long inside the handler (inside the delivery transaction).
    pub fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    pub fn in_flight(mut self, in_flight: Arc<InFlight>) -> Self {
        self.in_flight = in_flight;
        self
    }

    pub fn build(self) -> Arc<Self> {
        Arc::new(self)
    }

    pub async fn calls(&self) -> Vec<Call> {
        self.calls.lock().await.clone()
    }

    pub async fn calls_for(&self, event_id: Uuid) -> Vec<Call> {
        self.calls
            .lock()
            .await
            .iter()
            .filter(|c| c.event_id == event_id)
            .cloned()
            .collect()
    }
}

#[async_trait]
impl Consumer for Recorder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn wants(&self, event_type: &str) -> bool {
        self.kinds
            .as_ref()
            .is_none_or(|kinds| kinds.contains(&event_type))
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        const Q: &str =
            "INSERT INTO effects (consumer, event_id, sequence, tag) VALUES ($1, $2, $3, $4)";
        let _running = self.in_flight.enter();
        let prior = {
            let mut calls = self.calls.lock().await;
            let prior = calls.iter().filter(|c| c.event_id == event.id).count();
            calls.push(Call {
                sequence: event.sequence,
                event_id: event.id,
                kind: event.kind.clone(),
                at: Utc::now(),
            });
            prior
        };
        with_tx!(tx, conn => {
            sqlx::query(Q)
                .bind(self.name)
                .bind(event.id.to_string())
                .bind(event.sequence)
                .bind(self.tag)
                .execute(conn)
                .await
                .map_err(|e| HandlerError::new(e.to_string()))?;
        });
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        assert!(
            !(self.panic)(event, prior),
            "test handler panics on event {}",
            event.sequence
        );
        match (self.fail)(event, prior) {
            Some(message) => Err(HandlerError::new(message)),
            None => Ok(()),
        }
    }
}

/// Effect rows of a consumer: (event id, sequence, tag), in insertion order of
/// sequence.
pub async fn effects(db: &Database, consumer: &str) -> Vec<(String, i64, String)> {
    const Q: &str =
        "SELECT event_id, sequence, tag FROM effects WHERE consumer = $1 ORDER BY sequence";
    with_pool!(db, pool => {
        sqlx::query_as(Q).bind(consumer).fetch_all(pool).await.expect("effects")
    })
}

pub async fn effect_count(db: &Database, consumer: &str) -> i64 {
    const Q: &str = "SELECT COUNT(*) FROM effects WHERE consumer = $1";
    with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind(consumer).fetch_one(pool).await.expect("count effects")
    })
}

pub async fn effects_of_event(db: &Database, consumer: &str, event_id: Uuid) -> i64 {
    const Q: &str = "SELECT COUNT(*) FROM effects WHERE consumer = $1 AND event_id = $2";
    with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind(consumer).bind(event_id.to_string()).fetch_one(pool).await
            .expect("count effects")
    })
}

/// The consumer's position (0 before registration).
pub async fn position(db: &Database, consumer: &str) -> i64 {
    const Q: &str = "SELECT position FROM event_consumers WHERE name = $1";
    let position: Option<i64> = with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind(consumer).fetch_optional(pool).await.expect("position")
    });
    position.unwrap_or(0)
}

pub async fn set_position(db: &Database, consumer: &str, to: i64) {
    const Q: &str = "UPDATE event_consumers SET position = $2 WHERE name = $1";
    let done = with_pool!(db, pool => {
        sqlx::query(Q).bind(consumer).bind(to).execute(pool).await.expect("reset position")
            .rows_affected()
    });
    assert_eq!(done, 1, "consumer {consumer} is registered");
}

/// (lease owner, lease until) of a consumer.
pub async fn lease(db: &Database, consumer: &str) -> (Option<String>, Option<DateTime<Utc>>) {
    const Q: &str = "SELECT lease_owner, lease_until FROM event_consumers WHERE name = $1";
    with_pool!(db, pool => {
        sqlx::query_as(Q).bind(consumer).fetch_one(pool).await.expect("lease")
    })
}

pub async fn head(db: &Database) -> i64 {
    EventLog::new(db.clone()).head().await.expect("head")
}

/// (rows, distinct events) in the consumer's inbox.
pub async fn inbox(db: &Database, consumer: &str) -> (i64, i64) {
    const Q: &str =
        "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM event_inbox WHERE consumer = $1";
    with_pool!(db, pool => {
        sqlx::query_as(Q).bind(consumer).fetch_one(pool).await.expect("inbox")
    })
}

pub async fn inbox_has(db: &Database, consumer: &str, event_id: Uuid) -> i64 {
    const Q: &str = "SELECT COUNT(*) FROM event_inbox WHERE consumer = $1 AND event_id = $2";
    with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind(consumer).bind(event_id).fetch_one(pool).await.expect("inbox")
    })
}

pub use scaleshop_testkit::Crashable;

/// Polls `check` until it holds or `within` passes; says whether it held.
pub async fn holds_within(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A consumer that fails on `poison` (with "poison attempt N") while `broken`
/// holds, and handles everything else.
pub fn poisoned(
    name: &'static str,
    poison: Uuid,
    broken: &Arc<std::sync::atomic::AtomicBool>,
) -> Arc<Recorder> {
    let broken = broken.clone();
    Recorder::new(name)
        .failing(move |event, prior| {
            (event.id == poison && broken.load(Ordering::SeqCst))
                .then(|| format!("poison attempt {}", prior + 1))
        })
        .build()
}
