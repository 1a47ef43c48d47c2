//! The running projection: the generation that serves searches, the follower
//! that feeds it from the log (woken on commit, like every loop here), the wait
//! of a read that carries a consistency token, and the rebuild that makes a new
//! generation from the whole log while the old one serves, then swaps.
//!
//! During a rebuild the old generation keeps following the log beside the
//! build, so a write committed meanwhile is searchable as soon as outside a
//! rebuild, and a read that waits for the log's head is still answered by the
//! index. The new generation is swapped in once it has read the log to its head
//! and reached at least the position the old one served: the position never
//! goes back. A shutdown during the build leaves the old generation current (the
//! next start removes the half-built folder).
//!
//! On disk: `DIR/current` names the serving generation's folder (`DIR/gN`),
//! written by rename. A generation of an older schema, one that cannot be
//! opened, or one ahead of the log (the database was replaced) is built again.
//!
//! There is no check for an index too far behind the log: the log (the outbox,
//! the `events` table) is never compacted, so an index can always catch up from
//! its position, however old. Should the log ever drop old events, an index
//! whose position is below the oldest event kept must be built again, as one
//! ahead of the log is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use scaleshop_db::{Database, Topic};
use scaleshop_events::{Event, EventLog};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::SearchError;
use crate::index::Generation;
use crate::query::{SearchHits, SearchQuery};

/// The projection's name: its metric label and its admin route.
pub const NAME: &str = "product-search";

/// Events read and committed at once while following the log.
const BATCH: i64 = 1000;
/// Events per commit while building a generation from the whole log.
const BUILD_BATCH: i64 = 5000;

/// Where the projection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ProjectionState)]
pub enum State {
    /// Applying the log up to its head for the first time since the start:
    /// searches are answered by the command side until it is done.
    CatchingUp,
    /// Serving, and following the log.
    Live,
    /// Serving from the old generation, which keeps following the log, while a
    /// new one is built from the whole log.
    Rebuilding,
    /// An event could not be applied; retried, searches with a token go to the
    /// command side meanwhile.
    Stuck,
}

/// The product search projection of this process.
#[derive(Clone)]
pub struct ProductSearch {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProductSearch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProductSearch")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

struct Inner {
    dir: PathBuf,
    current: ArcSwap<Generation>,
    position: watch::Sender<i64>,
    state: Mutex<(State, Option<String>)>,
    rebuild: AtomicBool,
    wake: Notify,
    /// Searches running at once: one per core. A search is CPU work on the
    /// blocking pool; more at once only queue for the cores, and each extra
    /// pool thread keeps an allocator heap of its own.
    searches: Semaphore,
}

/// What `GET /v1/projections` shows of one projection.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = ProjectionStatus)]
pub struct Status {
    pub name: &'static str,
    pub state: State,
    /// The last event of the log applied.
    pub position: i64,
    /// Events of the log not applied yet.
    pub lag: i64,
    pub documents: u64,
    /// SHA-256 of every document the index holds, in id order: two indexes with
    /// the same digest hold the same products with the same stock.
    pub digest: String,
    /// The folder of the serving generation.
    pub generation: String,
    /// Why the projection is stuck, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn generation_number(name: &str) -> Option<u64> {
    name.strip_prefix('g')?.parse().ok()
}

fn write_current(dir: &Path, name: &str) -> Result<(), SearchError> {
    let tmp = dir.join("current.tmp");
    std::fs::write(&tmp, name).map_err(|e| SearchError::io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join("current")).map_err(|e| SearchError::io(dir, e))
}

/// A new, empty generation folder after the newest one in `dir`.
fn fresh_generation(dir: &Path) -> Result<Generation, SearchError> {
    let newest = std::fs::read_dir(dir)
        .map_err(|e| SearchError::io(dir, e))?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| generation_number(&entry.file_name().to_string_lossy()))
        .max()
        .unwrap_or(0);
    let path = dir.join(format!("g{}", newest + 1));
    Generation::open(&path)
}

fn remove_generation(generation: Arc<Generation>) {
    let dir = generation.dir.clone();
    if let Ok(generation) = Arc::try_unwrap(generation) {
        generation.close();
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "an old search index folder stays");
    }
}

impl ProductSearch {
    /// Opens the serving generation in `dir` (made when missing or unusable).
    /// Blocking (file system); call at start.
    pub fn open(dir: &Path) -> Result<Self, SearchError> {
        std::fs::create_dir_all(dir).map_err(|e| SearchError::io(dir, e))?;
        let named = std::fs::read_to_string(dir.join("current"))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| generation_number(s).is_some());
        let generation = match named.map(|name| Generation::open(&dir.join(name))) {
            Some(Ok(generation)) => generation,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the search index is built again from the log");
                fresh_generation(dir)?
            }
            None => fresh_generation(dir)?,
        };
        write_current(
            dir,
            &generation
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )?;
        let position = generation.position()?;
        // Folders of other generations (an interrupted rebuild) are left-overs.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.filter_map(|e| e.ok()) {
                let path = entry.path();
                if path != generation.dir
                    && generation_number(&entry.file_name().to_string_lossy()).is_some()
                {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                current: ArcSwap::from_pointee(generation),
                position: watch::Sender::new(position),
                state: Mutex::new((State::CatchingUp, None)),
                rebuild: AtomicBool::new(false),
                wake: Notify::new(),
                searches: Semaphore::new(
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                ),
            }),
        })
    }

    /// The last event of the log applied.
    pub fn position(&self) -> i64 {
        *self.inner.position.borrow()
    }

    pub fn state(&self) -> State {
        self.inner.state.lock().0
    }

    /// Does the index answer searches without a token? Not while it catches up
    /// at start (it would miss most products), nor while stuck.
    pub fn serving(&self) -> bool {
        matches!(self.state(), State::Live | State::Rebuilding)
    }

    /// Waits (at most `timeout`) until the index has applied the log up to
    /// `position`. True when it has.
    pub async fn wait_for(&self, position: i64, timeout: Duration) -> bool {
        let mut rx = self.inner.position.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|p| *p >= position)).await,
            Ok(Ok(_))
        )
    }

    /// Runs a search on the serving generation (on the blocking pool).
    pub async fn search(&self, query: SearchQuery) -> Result<SearchHits, SearchError> {
        let _turn = self
            .inner
            .searches
            .acquire()
            .await
            .map_err(|e| SearchError::Index(e.to_string()))?;
        let generation = self.inner.current.load_full();
        tokio::task::spawn_blocking(move || generation.search(&query))
            .await
            .map_err(|e| SearchError::Index(e.to_string()))?
    }

    /// Every product the serving generation holds (checks and tests).
    pub async fn documents(&self) -> Result<Vec<crate::index::ProductDoc>, SearchError> {
        let generation = self.inner.current.load_full();
        tokio::task::spawn_blocking(move || generation.all())
            .await
            .map_err(|e| SearchError::Index(e.to_string()))?
    }

    /// Asks the follower to build a new generation from the whole log and swap
    /// to it; searches keep the current one meanwhile, which keeps following
    /// the log.
    pub fn request_rebuild(&self) {
        self.inner.rebuild.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    pub async fn status(&self, log: &EventLog) -> Result<Status, SearchError> {
        let head = log.head().await?;
        let generation = self.inner.current.load_full();
        let (state, error) = self.inner.state.lock().clone();
        let position = self.position();
        let digest = {
            let generation = generation.clone();
            tokio::task::spawn_blocking(move || -> Result<String, SearchError> {
                let mut digest = scaleshop_events::projection::Digest::default();
                for doc in generation.all()? {
                    digest.row(&doc);
                }
                Ok(digest.finish().1)
            })
            .await
            .map_err(|e| SearchError::Index(e.to_string()))??
        };
        Ok(Status {
            name: NAME,
            state,
            position,
            lag: (head - position).max(0),
            documents: generation.len(),
            digest,
            generation: generation
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            error,
        })
    }

    fn set_state(&self, state: State, error: Option<String>) {
        *self.inner.state.lock() = (state, error);
    }

    fn set_lag(lag: i64) {
        metrics::gauge!(scaleshop_telemetry::names::PROJECTION_LAG, "projection" => NAME)
            .set(lag.max(0) as f64);
    }

    /// Follows the log until `shutdown` turns true.
    pub fn spawn(
        &self,
        db: Database,
        poll: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let log = EventLog::new(db.clone());
            let signal = db.commit_signal(Topic::Events);
            if let Err(e) = this.check_against_log(&log).await {
                tracing::warn!(error = %e, "search index: the log's head could not be read at start");
            }
            while !*shutdown.borrow() {
                let notified = signal.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let mut wait = poll;
                if this.inner.rebuild.swap(false, Ordering::SeqCst) {
                    if let Err(e) = this.rebuild(&log, &signal, poll, &shutdown).await {
                        tracing::error!(error = %e, "search index rebuild failed; the old index serves");
                        this.set_state(State::Live, None);
                    }
                    continue;
                }
                match this.step(&log, BATCH).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "search index: applying the log failed; retrying");
                        this.set_state(State::Stuck, Some(e.to_string()));
                        wait = Duration::from_secs(2);
                    }
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = this.inner.wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
            }
        })
    }

    /// An index ahead of the log belongs to another database: start again.
    async fn check_against_log(&self, log: &EventLog) -> Result<(), SearchError> {
        let head = log.head().await?;
        if self.position() > head {
            tracing::warn!(
                position = self.position(),
                head,
                "the search index is ahead of the event log (another database?): building it again"
            );
            let dir = self.inner.dir.clone();
            let fresh = tokio::task::spawn_blocking(move || fresh_generation(&dir))
                .await
                .map_err(|e| SearchError::Index(e.to_string()))??;
            self.swap(fresh, 0)?;
        }
        Ok(())
    }

    /// Applies the next batch of the log; true when there may be more.
    async fn step(&self, log: &EventLog, batch: i64) -> Result<bool, SearchError> {
        let position = self.position();
        let events = log.list(position, batch).await?;
        if events.is_empty() {
            Self::set_lag(0);
            if !matches!(self.state(), State::Live | State::Rebuilding) {
                self.set_state(State::Live, None);
            }
            return Ok(false);
        }
        let full = events.len() as i64 >= batch;
        let last = apply(self.inner.current.load_full(), events).await?;
        self.inner.position.send_replace(last);
        if full {
            Self::set_lag(log.head().await? - last);
        } else {
            Self::set_lag(0);
        }
        if self.state() == State::Stuck {
            self.set_state(State::Live, None);
        }
        Ok(true)
    }

    /// Builds a new generation from the whole log while the current one serves
    /// and keeps following the log, then swaps to it once it has reached the
    /// head and at least the position served (a swap never goes back).
    ///
    /// The build and the follower of the serving generation run side by side on
    /// this task (their batches on the blocking pool): a write committed during
    /// the rebuild reaches the serving generation as it would outside one, so a
    /// read that waits for the log's head is still answered by the index. The
    /// follower stops only between its steps, never inside one, so the position
    /// it published is always what its generation has committed.
    async fn rebuild(
        &self,
        log: &EventLog,
        signal: &Notify,
        poll: Duration,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), SearchError> {
        self.set_state(State::Rebuilding, None);
        let dir = self.inner.dir.clone();
        let fresh = Arc::new(
            tokio::task::spawn_blocking(move || fresh_generation(&dir))
                .await
                .map_err(|e| SearchError::Index(e.to_string()))??,
        );
        let started = std::time::Instant::now();
        let position = match self.build_beside(log, signal, poll, shutdown, &fresh).await {
            Ok(Some(position)) => position,
            // Shut down: the next start finds the old generation current and
            // removes this one.
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || remove_generation(fresh)).await;
                return Err(e);
            }
        };
        let fresh = Arc::try_unwrap(fresh)
            .map_err(|_| SearchError::Index("the new index is still in use".into()))?;
        tracing::info!(
            position,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "search index rebuilt from the log"
        );
        // Under the state's lock: whoever sees `Rebuilding` has not seen the swap.
        let mut state = self.inner.state.lock();
        self.swap(fresh, position)?;
        *state = (State::Live, None);
        Ok(())
    }

    /// Fills `fresh` from the whole log while the serving generation follows
    /// it, then brings `fresh` up to the head and to at least the position
    /// served. Its position, or `None` when shut down first.
    async fn build_beside(
        &self,
        log: &EventLog,
        signal: &Notify,
        poll: Duration,
        shutdown: &watch::Receiver<bool>,
        fresh: &Arc<Generation>,
    ) -> Result<Option<i64>, SearchError> {
        let (built, stop_following) = watch::channel(false);
        let build = async {
            let reached = Self::build(log, fresh, 0, Some(shutdown)).await;
            built.send_replace(true);
            reached
        };
        let ((), reached) = tokio::join!(
            self.follow_while_building(log, signal, poll, stop_following, shutdown.clone()),
            build
        );
        let Some(position) = reached? else {
            return Ok(None);
        };
        // The events committed since the build's last read: at least up to what
        // the serving generation reached meanwhile.
        let position = Self::build(log, fresh, position, None)
            .await?
            .unwrap_or(position);
        let served = self.position();
        if position < served {
            return Err(SearchError::Index(format!(
                "the new index reached event {position} of the log, the serving one {served}: the log is shorter than what was served"
            )));
        }
        Ok(Some(position))
    }

    /// Applies the log after `position` to `generation` until a read finds no
    /// more; the last event applied (`position` when none). `None` when
    /// `shutdown` turned true first.
    async fn build(
        log: &EventLog,
        generation: &Arc<Generation>,
        mut position: i64,
        shutdown: Option<&watch::Receiver<bool>>,
    ) -> Result<Option<i64>, SearchError> {
        loop {
            if shutdown.is_some_and(|s| *s.borrow()) {
                return Ok(None);
            }
            let events = log.list(position, BUILD_BATCH).await?;
            if events.is_empty() {
                return Ok(Some(position));
            }
            position = apply(generation.clone(), events).await?;
        }
    }

    /// The follower of the serving generation during a rebuild, until `built`
    /// (or `shutdown`) turns true. A failure is retried as outside a rebuild,
    /// but the state stays `Rebuilding`: the new generation may be the cure.
    async fn follow_while_building(
        &self,
        log: &EventLog,
        signal: &Notify,
        poll: Duration,
        mut built: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        while !*built.borrow() && !*shutdown.borrow() {
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut wait = poll;
            match self.step(log, BATCH).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "search index: the serving index could not follow the log during a rebuild; retrying");
                    wait = Duration::from_secs(2);
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
                _ = built.changed() => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Makes `generation` the serving one (on disk first), removes the old one;
    /// `reached`: the last event it was given (after its last commit when the
    /// events since changed no document).
    fn swap(&self, generation: Generation, reached: i64) -> Result<(), SearchError> {
        let name = generation
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        write_current(&self.inner.dir, &name)?;
        let position = generation.position()?.max(reached);
        let old = self.inner.current.swap(Arc::new(generation));
        self.inner.position.send_replace(position);
        tokio::task::spawn_blocking(move || remove_generation(old));
        Ok(())
    }
}

async fn apply(generation: Arc<Generation>, events: Vec<Event>) -> Result<i64, SearchError> {
    let last = events.last().map_or(0, |e| e.sequence);
    tokio::task::spawn_blocking(move || generation.apply(&events))
        .await
        .map_err(|e| SearchError::Index(e.to_string()))??;
    Ok(last)
}
