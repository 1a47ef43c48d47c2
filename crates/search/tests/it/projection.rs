//! The running projection (`ProductSearch`) on a real log, on SQLite and on
//! PostgreSQL: a rebuild keeps the old index following the log until the swap,
//! and an index folder that is missing, built against another database or
//! unreadable is built from the log at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use scaleshop_contracts::catalog::ProductCreated;
use scaleshop_db::Database;
use scaleshop_events::{EventLog, NewEvent};
use scaleshop_search::{ProductSearch, SearchQuery, State};
use scaleshop_testkit::{Backend, eventually_within, fixture};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Upper bound of every wait for the follower: a test that needs longer has
/// failed.
const WAIT: Duration = Duration::from_secs(120);
/// How long a write made during the rebuild may take to reach the index.
const FRESH: Duration = Duration::from_secs(10);
/// The follower's poll; commits wake it sooner.
const POLL: Duration = Duration::from_millis(50);
/// Products in the log before the rebuild: enough that building them takes a
/// while (several batches of the build) on a debug build.
const LOG_SIZE: usize = 20_000;

async fn database(backend: Backend) -> Database {
    scaleshop_testkit::fresh_database(backend, &[scaleshop_events::migrations()]).await
}

/// A folder for an index that does not exist yet.
fn index_dir() -> PathBuf {
    scaleshop_testkit::temp_dir("scaleshop-search").join("index")
}

fn product(word: &str) -> (Uuid, ProductCreated) {
    let id = Uuid::now_v7();
    (
        id,
        ProductCreated {
            product_id: id,
            sku: format!("SKU-{}", id.simple()),
            name: format!("Mug {word}"),
            price_cents: 1_250,
            currency: "EUR".into(),
            initial_stock: 3,
            description: Some("A mug made for tests".into()),
            at: None,
        },
    )
}

/// Appends one `product.created` per word in one transaction; returns each
/// product's id and sequence.
async fn append_products(db: &Database, words: &[String]) -> Vec<(Uuid, i64)> {
    let mut tx = db.begin().await.unwrap();
    let mut appended = Vec::with_capacity(words.len());
    for word in words {
        let (id, created) = product(word);
        let event = NewEvent::typed(id, &created).unwrap();
        let sequence = scaleshop_events::append(&mut tx, &event).await.unwrap();
        appended.push((id, sequence));
    }
    tx.commit().await.unwrap();
    appended
}

/// A word of its own per product (searched for exactly).
fn word(n: usize) -> String {
    format!("w{n:06}probe")
}

fn query(text: &str) -> SearchQuery {
    SearchQuery {
        text: Some(text.into()),
        limit: 50,
        ..SearchQuery::default()
    }
}

async fn finds(search: &ProductSearch, text: &str, id: Uuid) -> bool {
    let hits = search.search(query(text)).await.unwrap();
    hits.hits.iter().any(|h| h.id == id)
}

/// A follower of the log into the index in `dir`.
struct Follower {
    search: ProductSearch,
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl Follower {
    fn start(dir: &Path, db: &Database) -> Self {
        let search = ProductSearch::open(dir).unwrap();
        let (stop, shutdown) = watch::channel(false);
        let handle = search.spawn(db.clone(), POLL, shutdown);
        Self {
            search,
            stop,
            handle,
        }
    }

    /// Waits until it serves and has applied the log up to its head.
    async fn live(&self, db: &Database) {
        let head = EventLog::new(db.clone()).head().await.unwrap();
        assert!(
            self.search.wait_for(head, WAIT).await,
            "the index reaches event {head}"
        );
        eventually_within(WAIT, "the index is live", async || {
            self.search.state() == State::Live
        })
        .await;
    }

    /// Stops the follower and lets the index go (its folder can be opened
    /// again).
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("the follower stops")
            .unwrap();
        drop(self.search);
    }
}

/// Every product of the log, as a fresh index built from it holds them, and
/// that index's digest.
async fn fresh_build(db: &Database) -> (Vec<scaleshop_search::index::ProductDoc>, String) {
    let follower = Follower::start(&index_dir(), db);
    follower.live(db).await;
    let docs = follower.search.documents().await.unwrap();
    let digest = follower
        .search
        .status(&EventLog::new(db.clone()))
        .await
        .unwrap()
        .digest;
    follower.stop().await;
    (docs, digest)
}

scaleshop_testkit::both!(
    a_rebuild_keeps_the_old_index_following_the_log,
    |backend| async move {
        let db = database(backend).await;
        let log = EventLog::new(db.clone());
        let words: Vec<String> = (0..LOG_SIZE).map(word).collect();
        append_products(&db, &words).await;
        let follower = Follower::start(&index_dir(), &db);
        follower.live(&db).await;
        let search = follower.search.clone();
        let before = search.status(&log).await.unwrap();
        assert_eq!(before.documents, LOG_SIZE as u64);

        // Every position the index publishes, watched from the side: it never
        // goes back, the swap included.
        let watching = Arc::new(AtomicBool::new(true));
        let went_back = Arc::new(AtomicI64::new(-1));
        let watcher = {
            let (search, watching, went_back) =
                (search.clone(), watching.clone(), went_back.clone());
            tokio::spawn(async move {
                let mut last = search.position();
                let deadline = Instant::now() + WAIT;
                while watching.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let now = search.position();
                    if now < last {
                        went_back.store(last, Ordering::SeqCst);
                    }
                    last = now;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };

        search.request_rebuild();
        eventually_within(WAIT, "the rebuild starts", async || {
            search.state() == State::Rebuilding
        })
        .await;
        let started = Instant::now();
        // While it builds, each write reaches the (old) index promptly and is
        // found there.
        let mut written = Vec::new();
        let mut while_rebuilding = 0;
        for n in LOG_SIZE..LOG_SIZE + 200 {
            if search.state() != State::Rebuilding {
                break;
            }
            let w = word(n);
            let (id, sequence) = append_products(&db, std::slice::from_ref(&w)).await[0];
            let at = Instant::now();
            assert!(
                search.wait_for(sequence, FRESH).await,
                "the index reaches event {sequence} within {FRESH:?} (state {:?})",
                search.state()
            );
            let reached = at.elapsed();
            assert!(finds(&search, &w, id).await, "{w} is found");
            // Seen `Rebuilding` after the search: the swap had not happened, so
            // the old generation had the write.
            if search.state() == State::Rebuilding {
                while_rebuilding += 1;
                eprintln!("{w} (event {sequence}) reached the old index in {reached:?}");
            }
            written.push((w, id));
        }
        assert!(
            while_rebuilding >= 1,
            "a write was made and found while the index was rebuilt (the rebuild took {:?})",
            started.elapsed()
        );
        eventually_within(WAIT, "the rebuild ends", async || {
            search.state() == State::Live
        })
        .await;
        eprintln!(
            "rebuilt in about {:?}; {while_rebuilding} writes found meanwhile",
            started.elapsed()
        );
        watching.store(false, Ordering::SeqCst);
        watcher.await.unwrap();
        assert_eq!(
            went_back.load(Ordering::SeqCst),
            -1,
            "the index's position went back"
        );

        // The new generation serves, holds every write (those made during the
        // build too) and equals a fresh build from the log.
        let head = log.head().await.unwrap();
        assert!(search.wait_for(head, WAIT).await);
        let after = search.status(&log).await.unwrap();
        assert_ne!(after.generation, before.generation, "swapped");
        assert_eq!(after.documents, (LOG_SIZE + written.len()) as u64);
        for (w, id) in &written {
            assert!(finds(&search, w, *id).await, "{w} is found after the swap");
        }
        let docs = search.documents().await.unwrap();
        let (fresh_docs, fresh_digest) = fresh_build(&db).await;
        assert_eq!(docs, fresh_docs);
        assert_eq!(after.digest, fresh_digest);
        follower.stop().await;
    }
);

scaleshop_testkit::both!(
    a_shutdown_during_a_rebuild_keeps_the_old_index,
    |backend| async move {
        let db = database(backend).await;
        let words: Vec<String> = (0..LOG_SIZE).map(word).collect();
        append_products(&db, &words).await;
        let dir = index_dir();
        let follower = Follower::start(&dir, &db);
        follower.live(&db).await;
        let generation = follower
            .search
            .status(&EventLog::new(db.clone()))
            .await
            .unwrap()
            .generation;
        follower.search.request_rebuild();
        eventually_within(WAIT, "the rebuild starts", async || {
            follower.search.state() == State::Rebuilding
        })
        .await;
        follower.stop().await;
        // The old generation is current; the half-built one is removed.
        let current = std::fs::read_to_string(dir.join("current")).unwrap();
        assert_eq!(current.trim(), generation);
        let follower = Follower::start(&dir, &db);
        let folders: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with('g'))
            .collect();
        assert_eq!(folders, vec![generation]);
        follower.live(&db).await;
        assert_eq!(follower.search.documents().await.unwrap().len(), LOG_SIZE);
        follower.stop().await;
    }
);

scaleshop_testkit::both!(
    a_missing_index_is_built_from_the_log_at_start,
    |backend| async move {
        let db = database(backend).await;
        let words: Vec<String> = (0..5).map(word).collect();
        let products = append_products(&db, &words).await;
        let dir = index_dir();
        assert!(!dir.exists());
        let follower = Follower::start(&dir, &db);
        follower.live(&db).await;
        assert_eq!(follower.search.position(), products[4].1);
        for (w, (id, _)) in words.iter().zip(&products) {
            assert!(finds(&follower.search, w, *id).await, "{w} is found");
        }
        assert_eq!(follower.search.documents().await.unwrap().len(), 5);
        follower.stop().await;
    }
);

scaleshop_testkit::both!(
    an_index_ahead_of_the_log_is_built_again,
    |backend| async move {
        let dir = index_dir();
        // Built against one database...
        let first = database(backend).await;
        let old: Vec<String> = (0..10).map(word).collect();
        append_products(&first, &old).await;
        let follower = Follower::start(&dir, &first);
        follower.live(&first).await;
        let first_head = EventLog::new(first.clone()).head().await.unwrap();
        assert_eq!(follower.search.position(), first_head);
        follower.stop().await;
        // ...opened against another, whose log is shorter.
        let second = database(backend).await;
        let new: Vec<String> = (100..103).map(word).collect();
        let products = append_products(&second, &new).await;
        let head = EventLog::new(second.clone()).head().await.unwrap();
        assert!(head < first_head);
        let follower = Follower::start(&dir, &second);
        follower.live(&second).await;
        assert_eq!(follower.search.position(), head);
        let docs = follower.search.documents().await.unwrap();
        let mut ids: Vec<Uuid> = docs.iter().map(|d| d.id).collect();
        ids.sort();
        let mut expected: Vec<Uuid> = products.iter().map(|(id, _)| *id).collect();
        expected.sort();
        assert_eq!(ids, expected, "only the second log's products");
        for (w, (id, _)) in new.iter().zip(&products) {
            assert!(finds(&follower.search, w, *id).await, "{w} is found");
        }
        follower.stop().await;
    }
);

scaleshop_testkit::both!(an_unreadable_index_is_built_again, |backend| async move {
    let db = database(backend).await;
    let words: Vec<String> = (0..5).map(word).collect();
    let products = append_products(&db, &words).await;
    let dir = index_dir();
    let follower = Follower::start(&dir, &db);
    follower.live(&db).await;
    follower.stop().await;
    let current = std::fs::read_to_string(dir.join("current")).unwrap();
    let broken = dir.join(current.trim());
    std::fs::write(broken.join("meta.json"), b"not an index").unwrap();

    let follower = Follower::start(&dir, &db);
    assert!(!broken.exists(), "the unreadable folder is removed");
    follower.live(&db).await;
    assert_eq!(follower.search.position(), products[4].1);
    assert_eq!(follower.search.documents().await.unwrap().len(), 5);
    for (w, (id, _)) in words.iter().zip(&products) {
        assert!(finds(&follower.search, w, *id).await, "{w} is found");
    }
    follower.stop().await;
});
