//! The tiered cache against a real Redis (started per test on a free port).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod ratelimit;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use scaleshop_cache::{CacheSettings, Invalidate, Redis, TieredCache, dispatch_invalidation};
use scaleshop_testkit::RedisServer;
use tokio::sync::watch;

fn settings() -> CacheSettings {
    CacheSettings {
        lease_wait: Duration::from_millis(600),
        ..CacheSettings::default()
    }
}

fn redis(server: &RedisServer) -> Redis {
    Redis::connect(&server.url(), Duration::from_millis(50)).unwrap()
}

/// A loader over a shared "database" value, counting its calls.
#[derive(Clone, Default)]
struct Source {
    value: Arc<std::sync::RwLock<Option<String>>>,
    loads: Arc<AtomicUsize>,
}

impl Source {
    fn set(&self, value: Option<&str>) {
        *self.value.write().unwrap() = value.map(str::to_owned);
    }

    fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }

    async fn load(&self, delay: Duration) -> Result<Option<String>, std::io::Error> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let value = self.value.read().unwrap().clone();
        tokio::time::sleep(delay).await;
        Ok(value)
    }
}

async fn read(cache: &TieredCache<String>, source: &Source, key: &str) -> Option<String> {
    let s = source.clone();
    cache
        .get_or_load(key, None, || async move { s.load(Duration::ZERO).await })
        .await
        .unwrap()
        .map(|v| (*v).clone())
}

#[tokio::test]
async fn l1_hit_after_a_miss_without_redis() {
    let cache = TieredCache::new("t", None, settings());
    let source = Source::default();
    source.set(Some("a"));
    assert_eq!(read(&cache, &source, "k").await.as_deref(), Some("a"));
    assert_eq!(read(&cache, &source, "k").await.as_deref(), Some("a"));
    assert_eq!(source.loads(), 1);
}

#[tokio::test]
async fn a_disabled_cache_keeps_nothing_in_either_tier() {
    let server = RedisServer::start();
    let cache = TieredCache::new(
        "t",
        Some(redis(&server)),
        CacheSettings {
            enabled: false,
            ..settings()
        },
    );
    let source = Source::default();
    source.set(Some("v1"));
    assert_eq!(read(&cache, &source, "k").await.as_deref(), Some("v1"));
    assert_eq!(read(&cache, &source, "k").await.as_deref(), Some("v1"));
    assert_eq!(source.loads(), 2);
    // Nothing went to L2 either: another process's cache sees no entry.
    let other = TieredCache::new("t", Some(redis(&server)), settings());
    assert_eq!(read(&other, &source, "k").await.as_deref(), Some("v1"));
    assert_eq!(source.loads(), 3);
}

#[tokio::test]
async fn a_missing_value_is_cached_briefly_not_taken_for_a_miss() {
    let settings = CacheSettings {
        negative_ttl: Duration::from_millis(300),
        ..settings()
    };
    let cache = TieredCache::new("t", None, settings);
    let source = Source::default();
    assert_eq!(read(&cache, &source, "gone").await, None);
    assert_eq!(read(&cache, &source, "gone").await, None);
    assert_eq!(source.loads(), 1, "the absence was cached");
    tokio::time::sleep(Duration::from_millis(500)).await;
    source.set(Some("born"));
    assert_eq!(
        read(&cache, &source, "gone").await.as_deref(),
        Some("born"),
        "negative TTL expired"
    );
    // An empty string is a value, not a miss.
    source.set(Some(""));
    let cache = TieredCache::new("t2", None, CacheSettings::default());
    assert_eq!(read(&cache, &source, "e").await.as_deref(), Some(""));
    assert_eq!(read(&cache, &source, "e").await.as_deref(), Some(""));
    assert_eq!(source.loads(), 3);
}

#[tokio::test]
async fn l1_entries_expire_after_their_ttl() {
    let cache = TieredCache::new(
        "t",
        None,
        CacheSettings {
            l1_ttl: Duration::from_millis(200),
            ..settings()
        },
    );
    let source = Source::default();
    source.set(Some("v1"));
    read(&cache, &source, "k").await;
    source.set(Some("v2"));
    assert_eq!(read(&cache, &source, "k").await.as_deref(), Some("v1"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(read(&cache, &source, "k").await.as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_cold_reads_load_once() {
    let cache = Arc::new(TieredCache::new("t", None, settings()));
    let source = Source::default();
    source.set(Some("hot"));
    let reads = (0..1000).map(|_| {
        let (cache, source) = (cache.clone(), source.clone());
        tokio::spawn(async move {
            let s = source.clone();
            cache
                .get_or_load("cold", None, || async move {
                    s.load(Duration::from_millis(50)).await
                })
                .await
                .unwrap()
        })
    });
    for r in futures::future::join_all(reads).await {
        assert_eq!(
            r.unwrap().as_deref().map(|cached| cached.as_str()),
            Some("hot")
        );
    }
    assert_eq!(source.loads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_l2_and_a_cold_key_costs_one_load_per_cluster() {
    let server = RedisServer::start();
    let a = Arc::new(TieredCache::new("t", Some(redis(&server)), settings()));
    let b = Arc::new(TieredCache::new("t", Some(redis(&server)), settings()));
    let source = Source::default();
    source.set(Some("shared"));
    let reads = (0..400).map(|i| {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let source = source.clone();
        tokio::spawn(async move {
            let s = source.clone();
            cache
                .get_or_load("cold", None, || async move {
                    s.load(Duration::from_millis(100)).await
                })
                .await
                .unwrap()
        })
    });
    for r in futures::future::join_all(reads).await {
        assert_eq!(
            r.unwrap().as_deref().map(|cached| cached.as_str()),
            Some("shared")
        );
    }
    assert_eq!(source.loads(), 1, "one load for both processes");
    // A third process finds it in L2.
    let c = TieredCache::new("t", Some(redis(&server)), settings());
    assert_eq!(read(&c, &source, "cold").await.as_deref(), Some("shared"));
    assert_eq!(source.loads(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_process_reaches_the_others_through_pubsub() {
    let server = RedisServer::start();
    let a = Arc::new(TieredCache::<String>::new(
        "t",
        Some(redis(&server)),
        settings(),
    ));
    let b = Arc::new(TieredCache::<String>::new(
        "t",
        Some(redis(&server)),
        settings(),
    ));
    let (stop, stopped) = watch::channel(false);
    let listener = {
        let caches: Vec<Arc<dyn Invalidate>> = vec![b.clone()];
        let redis = redis(&server);
        tokio::spawn(async move {
            redis
                .subscribe(move |m| dispatch_invalidation(&caches, m), stopped)
                .await
        })
    };
    let source = Source::default();
    source.set(Some("old"));
    assert_eq!(read(&b, &source, "k").await.as_deref(), Some("old"));
    tokio::time::sleep(Duration::from_millis(200)).await; // the subscription is up
    source.set(Some("new"));
    a.invalidate("k").await;
    let start = Instant::now();
    let mut seen = None;
    while start.elapsed() < Duration::from_secs(5) {
        seen = read(&b, &source, "k").await;
        if seen.as_deref() == Some("new") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen.as_deref(), Some("new"));
    eprintln!(
        "invalidation reached the other process after {:?}",
        start.elapsed()
    );
    let _ = stop.send(true);
    let _ = listener.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loader_never_writes_back_a_value_older_than_an_invalidation() {
    let server = RedisServer::start();
    let a = Arc::new(TieredCache::<String>::new(
        "t",
        Some(redis(&server)),
        settings(),
    ));
    let source = Source::default();
    source.set(Some("old"));
    let slow = {
        let (a, source) = (a.clone(), source.clone());
        tokio::spawn(async move {
            let s = source.clone();
            a.get_or_load("k", None, || async move {
                s.load(Duration::from_millis(400)).await
            })
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await; // the slow load has read "old"
    source.set(Some("new"));
    a.invalidate("k").await;
    assert_eq!(
        slow.await.unwrap().as_deref().map(|cached| cached.as_str()),
        Some("old")
    );
    // Neither tier kept the old value.
    assert_eq!(read(&a, &source, "k").await.as_deref(), Some("new"));
    let other = TieredCache::<String>::new("t", Some(redis(&server)), settings());
    assert_eq!(read(&other, &source, "k").await.as_deref(), Some("new"));
}

#[tokio::test]
async fn a_consistency_token_newer_than_the_entry_bypasses_it() {
    let cache = TieredCache::<String>::new("t", None, settings());
    let source = Source::default();
    source.set(Some("v1"));
    read(&cache, &source, "k").await;
    source.set(Some("v2"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let s = source.clone();
    let fresh = cache
        .get_or_load(
            "k",
            Some(now),
            || async move { s.load(Duration::ZERO).await },
        )
        .await
        .unwrap();
    assert_eq!(fresh.as_deref().map(|cached| cached.as_str()), Some("v2"));
    // An older token is satisfied by the (refreshed) entry.
    let s = source.clone();
    let again = cache
        .get_or_load("k", Some(now - 1_000_000), || async move {
            s.load(Duration::ZERO).await
        })
        .await
        .unwrap();
    assert_eq!(again.as_deref().map(|cached| cached.as_str()), Some("v2"));
    assert_eq!(source.loads(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_then_killed_then_back() {
    let server = RedisServer::start();
    let port = server.port;
    let cache = TieredCache::<String>::new("t", Some(redis(&server)), settings());
    let source = Source::default();
    source.set(Some("v"));
    assert_eq!(read(&cache, &source, "warm").await.as_deref(), Some("v"));

    // A hung Redis (SIGSTOP): reads keep working, each bounded.
    server.signal("-STOP");
    for key in ["warm", "cold-1", "cold-2", "cold-3"] {
        let started = Instant::now();
        assert_eq!(read(&cache, &source, key).await.as_deref(), Some("v"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{key} took {:?}",
            started.elapsed()
        );
    }
    // A dead Redis.
    drop(server);
    for key in ["cold-4", "cold-5"] {
        let started = Instant::now();
        assert_eq!(read(&cache, &source, key).await.as_deref(), Some("v"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Back on the same port: used again once the breaker closes.
    let server = RedisServer::start_on(port);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let fresh_process = TieredCache::<String>::new("t", Some(redis(&server)), settings());
    let mut key = 0;
    loop {
        key += 1;
        let name = format!("after-{key}");
        read(&cache, &source, &name).await;
        let loads = source.loads();
        // Another process finds it in L2: Redis holds it again.
        read(&fresh_process, &source, &name).await;
        if source.loads() == loads {
            break;
        }
        assert!(Instant::now() < deadline, "Redis was not used again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
