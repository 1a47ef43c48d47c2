//! The tiered cache (cache-aside): L1 is moka in each process (TTL 5 min, bounded
//! size); L2 is Redis shared by every process (TTL 1 h) when configured.
//!
//! - **Single-flight**: concurrent misses on one key load once per process (moka's
//!   `try_get_with`), and across processes a short Redis lease makes a cold key
//!   cost one load per cluster while the others wait briefly for L2 to fill.
//! - **Negative caching**: a missing id is cached too (briefly), so a flood of
//!   requests for it does not reach the database; a cached `None` is a hit, never
//!   mistaken for a miss.
//! - **Versioned entries**: an invalidation bumps a version (locally a logical
//!   clock, in Redis a generation per key); a load that started before it can
//!   never be served or written back after it.
//! - **Invalidation everywhere**: a write drops L2 and publishes the key; every
//!   process drops its L1 copy (Redis pub/sub), and the event log does it too
//!   (`invalidate_local`), so a lost message heals.
//! - **Read-your-writes**: a read that carries a consistency token newer than the
//!   entry bypasses the cache.
//! - **Degrades, never fails**: Redis calls time out quickly and errors fall back
//!   to the database, with a metric.
//!
//! This crate knows no service and no table; values are anything serde can carry.

mod redis_tier;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use scaleshop_telemetry::{names, trace};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

pub use redis_tier::{CHANNEL, RateDecision, Redis, RedisError};

#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `false`: no tier keeps anything; every read loads from the database.
    pub enabled: bool,
    pub l1_ttl: Duration,
    pub l1_capacity: u64,
    pub l2_ttl: Duration,
    /// How long a missing id is remembered as missing.
    pub negative_ttl: Duration,
    /// How long one process may load a cold key before others stop waiting.
    pub lease_ttl: Duration,
    /// How long others wait for that load to reach L2.
    pub lease_wait: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            l1_ttl: Duration::from_secs(300),
            l1_capacity: 100_000,
            l2_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(2),
            lease_wait: Duration::from_millis(300),
        }
    }
}

/// A cached value, with its JSON form rendered at most once per L1 entry, so a
/// hit answered as JSON costs no serialization. Derefs to the value.
#[derive(Debug)]
pub struct Cached<T> {
    value: T,
    json: OnceLock<Bytes>,
}

impl<T> Cached<T> {
    fn new(value: T) -> Self {
        Self {
            value,
            json: OnceLock::new(),
        }
    }
}

impl<T: Serialize> Cached<T> {
    /// The value as JSON (`serde_json`'s rendering of `T`), rendered on first use.
    pub fn json(&self) -> Result<Bytes, serde_json::Error> {
        if let Some(json) = self.json.get() {
            return Ok(json.clone());
        }
        let rendered = Bytes::from(serde_json::to_vec(&self.value)?);
        Ok(self.json.get_or_init(|| rendered).clone())
    }
}

impl<T> std::ops::Deref for Cached<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

/// An L1 entry: the value (or its absence), when it was read from the database,
/// and the local clock when its load started.
#[derive(Debug)]
struct Entry<T> {
    value: Option<Arc<Cached<T>>>,
    loaded_at_micros: i64,
    started: u64,
    /// For a cached absence: when it stops counting (the negative TTL). Values
    /// live for the cache's TTL, which moka checks without a per-entry timer.
    absent_until: Option<Instant>,
}

impl<T> Entry<T> {
    fn new(value: Option<T>, loaded_at_micros: i64, started: u64, negative_ttl: Duration) -> Self {
        let absent_until = value.is_none().then(|| Instant::now() + negative_ttl);
        Self {
            value: value.map(|v| Arc::new(Cached::new(v))),
            loaded_at_micros,
            started,
            absent_until,
        }
    }

    fn expired(&self) -> bool {
        self.absent_until
            .is_some_and(|until| Instant::now() >= until)
    }
}

/// What L2 holds for a key.
#[derive(Debug, Serialize, serde::Deserialize)]
struct Stored<T> {
    #[serde(rename = "t")]
    loaded_at_micros: i64,
    #[serde(rename = "v")]
    value: Option<T>,
}

/// What a loader read, and how fresh it is: `as_of_micros` (µs since the epoch)
/// is a time before which every write is in `value`. A loader that read a read
/// replica says so, since its data can be older than the time of the read; one
/// that returns a bare `Option<T>` read current data.
#[derive(Debug)]
pub struct Loaded<T> {
    pub value: Option<T>,
    pub as_of_micros: Option<i64>,
}

impl<T> From<Option<T>> for Loaded<T> {
    fn from(value: Option<T>) -> Self {
        Self {
            value,
            as_of_micros: None,
        }
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The request counters of one cache, registered once (a lookup per read would
/// cost more than an L1 hit).
struct Counters {
    l1_hit: metrics::Counter,
    l1_miss: metrics::Counter,
    l2_hit: metrics::Counter,
    l2_miss: metrics::Counter,
}

impl Counters {
    fn new(cache: &'static str) -> Self {
        // The process-wide recorder must exist before handles are taken.
        drop(scaleshop_telemetry::metrics_handle());
        let counter = |tier: &'static str, result: &'static str| metrics::counter!(names::CACHE_REQUESTS, "cache" => cache, "tier" => tier, "result" => result);
        Self {
            l1_hit: counter("l1", "hit"),
            l1_miss: counter("l1", "miss"),
            l2_hit: counter("l2", "hit"),
            l2_miss: counter("l2", "miss"),
        }
    }
}

/// The L1 key hasher: foldhash (seeded per process) instead of SipHash, which was
/// a tenth of an L1 hit's lookup.
type L1Hasher = foldhash::quality::RandomState;

/// A named cache of `T` values.
pub struct TieredCache<T> {
    name: &'static str,
    counters: Counters,
    l1: moka::future::Cache<String, Arc<Entry<T>>, L1Hasher>,
    /// Local clock value of the last invalidation of each key (kept as long as an
    /// L1 entry can live; an older entry has expired anyway).
    invalidated: moka::sync::Cache<String, u64>,
    clock: AtomicU64,
    /// The local clock value of the latest invalidation of any key: an entry whose
    /// load started at or after it is valid without looking its key up.
    last_invalidation: AtomicU64,
    redis: Option<Redis>,
    settings: CacheSettings,
}

impl<T> std::fmt::Debug for TieredCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("name", &self.name)
            .field("l2", &self.redis.is_some())
            .finish()
    }
}

/// Something whose L1 copies can be dropped by key (for broadcast and event-log
/// invalidation across caches of different value types).
pub trait Invalidate: Send + Sync {
    fn name(&self) -> &'static str;
    fn invalidate_local(&self, key: &str);
}

impl<T> TieredCache<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    pub fn new(name: &'static str, redis: Option<Redis>, settings: CacheSettings) -> Self {
        let l1 = moka::future::Cache::builder()
            .max_capacity(settings.l1_capacity)
            .time_to_live(settings.l1_ttl)
            .build_with_hasher(L1Hasher::default());
        let invalidated = moka::sync::Cache::builder()
            .max_capacity(settings.l1_capacity)
            .time_to_live(settings.l1_ttl + Duration::from_secs(1))
            .build();
        Self {
            name,
            counters: Counters::new(name),
            l1,
            invalidated,
            clock: AtomicU64::new(1),
            last_invalidation: AtomicU64::new(0),
            redis,
            settings,
        }
    }

    fn valid(&self, key: &str, entry: &Entry<T>) -> bool {
        entry.started >= self.last_invalidation.load(Ordering::SeqCst)
            || entry.started >= self.invalidated.get(key).unwrap_or(0)
    }

    fn l2_keys(&self, key: &str) -> (String, String, String) {
        (
            format!("scaleshop:{}:{key}", self.name),
            format!("scaleshop:{}:{key}:gen", self.name),
            format!("scaleshop:{}:{key}:lease", self.name),
        )
    }

    /// The value for `key`: from L1, L2, or `load` (the database). `fresh_since`
    /// (microseconds since the epoch, from a consistency token) bypasses any entry
    /// read from the database before that time. `Ok(None)` is a known absence.
    pub async fn get_or_load<E, F, Fut, L>(
        &self,
        key: &str,
        fresh_since: Option<i64>,
        load: F,
    ) -> Result<Option<Arc<Cached<T>>>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<L, E>>,
        L: Into<Loaded<T>>,
    {
        if !self.settings.enabled {
            let started = self.clock.fetch_add(1, Ordering::SeqCst);
            let entry = Box::pin(self.load_from_database(key, started, load))
                .await
                .map_err(Arc::new)?;
            return Ok(entry.value);
        }
        // The hit path, kept small: moka's lookup future is large (it may run
        // maintenance) and almost always ready at once, so it is polled here, on
        // the stack, not made part of this future; everything else (a lookup that
        // has to wait, L2, the lease, the database) is boxed. A hit's future is
        // then a few words, which every layer above moves at no cost.
        let lookup = std::pin::pin!(self.l1.get(key));
        let found = lookup.poll(&mut Context::from_waker(Waker::noop()));
        if let Poll::Ready(Some(entry)) = found
            && self.servable(key, &entry, fresh_since)
        {
            self.counters.l1_hit.increment(1);
            if trace::enabled() {
                cache_span(self.name).record("cache.tier", "l1");
            }
            return Ok(entry.value.clone());
        }
        Box::pin(
            self.get_or_load_slowly(key, fresh_since, load)
                .instrument(cache_span(self.name)),
        )
        .await
    }

    /// An entry that may answer a read.
    fn servable(&self, key: &str, entry: &Entry<T>, fresh_since: Option<i64>) -> bool {
        let fresh = fresh_since.is_none_or(|t| entry.loaded_at_micros >= t);
        self.valid(key, entry) && fresh && !entry.expired()
    }

    /// [`Self::get_or_load`] past the quick look at L1.
    async fn get_or_load_slowly<E, F, Fut, L>(
        &self,
        key: &str,
        fresh_since: Option<i64>,
        load: F,
    ) -> Result<Option<Arc<Cached<T>>>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<L, E>>,
        L: Into<Loaded<T>>,
    {
        if let Some(entry) = self.l1.get(key).await {
            if self.servable(key, &entry, fresh_since) {
                self.counters.l1_hit.increment(1);
                tracing::Span::current().record("cache.tier", "l1");
                return Ok(entry.value.clone());
            }
            self.l1.invalidate(key).await;
        }
        self.counters.l1_miss.increment(1);
        let started = self.clock.fetch_add(1, Ordering::SeqCst);
        if fresh_since.is_some() {
            // Read-your-writes: straight to the database, then refresh the tiers.
            let entry = Arc::new(
                self.load_from_database(key, started, load)
                    .await
                    .map_err(Arc::new)?,
            );
            if self.valid(key, &entry) {
                self.l1.insert(key.to_owned(), entry.clone()).await;
            }
            return Ok(entry.value.clone());
        }
        let entry = self
            .l1
            .try_get_with(key.to_owned(), async {
                self.fill(key, started, load).await.map(Arc::new)
            })
            .await?;
        if !self.valid(key, &entry) {
            // Invalidated while loading: serve it to this caller (it was current
            // when read) but never keep it.
            self.l1.invalidate(key).await;
        }
        Ok(entry.value.clone())
    }

    /// L2, else the database under the cluster-wide load lease.
    async fn fill<E, F, Fut, L>(&self, key: &str, started: u64, load: F) -> Result<Entry<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<L, E>>,
        L: Into<Loaded<T>>,
    {
        let Some(redis) = &self.redis else {
            return self.load_from_database(key, started, load).await;
        };
        let (l2_key, generation_key, lease_key) = self.l2_keys(key);
        let l2 = tracing::info_span!(target: trace::SPANS, "redis", otel.name = "cache l2 get", otel.kind = "client", db.system.name = "redis");
        let generation = match redis.get(&l2_key, &generation_key).instrument(l2).await {
            Ok((Some(bytes), _)) => {
                if let Some(entry) = self.decode(&bytes, started) {
                    self.counters.l2_hit.increment(1);
                    tracing::Span::current().record("cache.tier", "l2");
                    return Ok(entry);
                }
                None
            }
            Ok((None, generation)) => Some(generation),
            Err(_) => None,
        };
        let Some(generation) = generation else {
            // Redis unavailable (or garbage in it): the database answers.
            return self.load_from_database(key, started, load).await;
        };
        self.counters.l2_miss.increment(1);
        let lease = redis
            .lease(&lease_key, self.settings.lease_ttl)
            .await
            .ok()
            .flatten();
        if lease.is_none() {
            // Another process is loading it: wait briefly for L2 to fill.
            let deadline = Instant::now() + self.settings.lease_wait;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if let Ok((Some(bytes), _)) = redis.get(&l2_key, &generation_key).await
                    && let Some(entry) = self.decode(&bytes, started)
                {
                    self.counters.l2_hit.increment(1);
                    return Ok(entry);
                }
            }
        }
        let entry = self.load_from_database(key, started, load).await?;
        let stored = Stored {
            loaded_at_micros: entry.loaded_at_micros,
            value: entry.value.as_deref().map(|cached| &cached.value),
        };
        if let Ok(bytes) = serde_json::to_vec(&stored) {
            let ttl = if entry.value.is_some() {
                self.settings.l2_ttl
            } else {
                self.settings.negative_ttl
            };
            let _ = redis
                .set_if_generation(&l2_key, &generation_key, &bytes, &generation, ttl)
                .await;
        }
        if let Some(token) = lease {
            let _ = redis.release(&lease_key, &token).await;
        }
        Ok(entry)
    }

    fn decode(&self, bytes: &[u8], started: u64) -> Option<Entry<T>> {
        let stored: Stored<T> = serde_json::from_slice(bytes).ok()?;
        Some(Entry::new(
            stored.value,
            stored.loaded_at_micros,
            started,
            self.settings.negative_ttl,
        ))
    }

    async fn load_from_database<E, F, Fut, L>(
        &self,
        key: &str,
        started: u64,
        load: F,
    ) -> Result<Entry<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<L, E>>,
        L: Into<Loaded<T>>,
    {
        // Taken before the read: the entry is at least this fresh (or as fresh
        // as the loader says, when it read a replica that is behind).
        let before = now_micros();
        tracing::Span::current().record("cache.tier", "database");
        let loaded: Loaded<T> = load().await?.into();
        let loaded_at_micros = loaded.as_of_micros.map_or(before, |at| at.min(before));
        let value = loaded.value;
        metrics::counter!(names::CACHE_LOADS, "cache" => self.name).increment(1);
        tracing::trace!(cache = self.name, key, "loaded from the database");
        Ok(Entry::new(
            value,
            loaded_at_micros,
            started,
            self.settings.negative_ttl,
        ))
    }

    /// After a write: drops the key here and in L2, bumps its version, and tells
    /// every process. Never fails: a Redis error is logged and counted (the event
    /// log still invalidates every process).
    pub async fn invalidate(&self, key: &str) {
        self.invalidate_here(key);
        self.l1.invalidate(key).await;
        if let Some(redis) = &self.redis {
            let (l2_key, generation_key, _) = self.l2_keys(key);
            let message = format!("{}\u{1f}{key}", self.name);
            let keep = self.settings.l2_ttl * 2;
            if let Err(e) = redis
                .invalidate(&l2_key, &generation_key, &message, keep)
                .await
            {
                metrics::counter!(names::CACHE_ERRORS, "op" => "invalidate").increment(1);
                tracing::warn!(cache = self.name, error = %e, "L2 invalidation failed");
            }
        }
    }

    fn invalidate_here(&self, key: &str) {
        let at = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
        self.invalidated.insert(key.to_owned(), at);
        self.last_invalidation.fetch_max(at, Ordering::SeqCst);
    }
}

impl<T> Invalidate for TieredCache<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }

    /// Drops the L1 copy only (a broadcast or an event said the key changed).
    fn invalidate_local(&self, key: &str) {
        self.invalidate_here(key);
        // moka's sync invalidation of the async cache happens on the next access
        // through the version check; also evict now when possible.
        let l1 = self.l1.clone();
        let key = key.to_owned();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { l1.invalidate(&key).await });
        }
    }
}

/// The span of one cache lookup, for traces only; `cache.tier` says which tier
/// answered (`l1`, `l2`, `database`).
fn cache_span(cache: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: trace::SPANS,
        "cache",
        otel.name = format!("cache {cache}"),
        cache.name = cache,
        cache.tier = tracing::field::Empty,
    )
}

/// Routes invalidation messages (`"<cache>\u{1f}<key>"`) to the named caches.
pub fn dispatch_invalidation(caches: &[Arc<dyn Invalidate>], message: &str) {
    if let Some((name, key)) = message.split_once('\u{1f}') {
        for cache in caches.iter().filter(|c| c.name() == name) {
            cache.invalidate_local(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize)]
    struct Product {
        name: &'static str,
        price_cents: i64,
    }

    #[test]
    fn json_is_serde_json_and_rendered_once() {
        let cached = Cached::new(Product {
            name: "Tea \"green\"",
            price_cents: 450,
        });
        let first = cached.json().unwrap();
        assert_eq!(
            first,
            serde_json::to_vec(&Product {
                name: "Tea \"green\"",
                price_cents: 450
            })
            .unwrap()
        );
        let second = cached.json().unwrap();
        // The same buffer, not a second rendering.
        assert_eq!(first.as_ptr(), second.as_ptr());
        assert_eq!(cached.price_cents, 450, "derefs to the value");
    }
}
