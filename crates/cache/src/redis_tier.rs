//! L2: Redis, shared by every process. Every call is bounded by a short timeout
//! (about 50 ms); a failure opens a breaker for a second, during which Redis is
//! skipped (reads go to L1 and the database), then it is tried again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, Script};
use tokio::sync::watch;

/// The pub/sub channel of L1 invalidations.
pub const CHANNEL: &str = "scaleshop:cache:invalidate";

/// A shared Redis connection (cheap to clone).
#[derive(Clone)]
pub struct Redis {
    client: Client,
    manager: ConnectionManager,
    timeout: Duration,
    open_until_ms: Arc<AtomicU64>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.write_str("Redis")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis: timed out")]
    Timeout,
    #[error("redis: skipped while the breaker is open")]
    Open,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sets `key` only if its generation is still the one read before loading, so a
/// slow loader never writes back a value older than an invalidation.
const SET_IF_GENERATION: &str = r"
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1";

/// Deletes the lease only if we still hold it.
const RELEASE_LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// GCRA (the algorithm of in-process limiters such as `governor`), kept in Redis
/// so every process shares one limit. KEYS[1] holds the theoretical arrival time
/// (TAT, microseconds of the Redis clock, so process clocks do not matter);
/// ARGV[1] is the emission interval and ARGV[2] the burst tolerance
/// (interval x (burst - 1)), both in microseconds. A request is refused while
/// `now < TAT - tolerance` and then waits `TAT - tolerance - now`; an admitted one
/// moves TAT to `max(TAT, now) + interval`, kept exactly as long as it matters
/// (a TAT in the past is the same as none). Returns {admitted (0/1), wait}.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now) or now
if tat < now then tat = now end
local earliest = tat - tolerance
if now < earliest then return {0, earliest - now} end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now) / 1000))
return {1, 0}";

static GCRA_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA));

/// The decision of [`Redis::rate_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Admitted,
    /// Refused; the next request of the key is admitted after `wait`.
    Refused {
        wait: Duration,
    },
}

impl Redis {
    /// A lazy connection: the process starts even if Redis is down.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, RedisError> {
        let client =
            Client::open(url).map_err(|e| RedisError::Redis(format!("bad URL: {:?}", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| RedisError::Redis(e.to_string()))?;
        Ok(Self {
            client,
            manager,
            timeout,
            open_until_ms: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn is_open(&self) -> bool {
        now_ms() < self.open_until_ms.load(Ordering::Relaxed)
    }

    async fn call<T, F>(&self, op: &'static str, f: F) -> Result<T, RedisError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if self.is_open() {
            return Err(RedisError::Open);
        }
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => RedisError::Redis(e.to_string()),
            Err(_) => RedisError::Timeout,
        };
        self.open_until_ms.store(now_ms() + 1000, Ordering::Relaxed);
        metrics::counter!(scaleshop_telemetry::names::CACHE_ERRORS, "op" => op).increment(1);
        tracing::debug!(op, error = %result, "redis call failed; falling back");
        Err(result)
    }

    /// (value, generation) of a key.
    pub async fn get(
        &self,
        key: &str,
        generation_key: &str,
    ) -> Result<(Option<Vec<u8>>, String), RedisError> {
        let mut conn = self.manager.clone();
        let (value, generation): (Option<Vec<u8>>, Option<String>) =
            self.call("get", conn.mget(&[key, generation_key])).await?;
        Ok((value, generation.unwrap_or_else(|| "0".to_owned())))
    }

    pub async fn set_if_generation(
        &self,
        key: &str,
        generation_key: &str,
        value: &[u8],
        generation: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let mut conn = self.manager.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let script = Script::new(SET_IF_GENERATION);
        let mut invocation = script.key(key);
        invocation
            .key(generation_key)
            .arg(value)
            .arg(generation)
            .arg(ttl_ms);
        let done: i64 = self.call("set", invocation.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }

    /// Tries to take the load lease of a key; the token to release it with.
    pub async fn lease(
        &self,
        lease_key: &str,
        ttl: Duration,
    ) -> Result<Option<String>, RedisError> {
        let mut conn = self.manager.clone();
        let token = uuid::Uuid::now_v7().simple().to_string();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(ttl_ms));
        let taken: Option<String> = self
            .call("lease", conn.set_options(lease_key, &token, options))
            .await?;
        Ok(taken.map(|_| token))
    }

    pub async fn release(&self, lease_key: &str, token: &str) -> Result<(), RedisError> {
        let mut conn = self.manager.clone();
        let script = Script::new(RELEASE_LEASE);
        let mut invocation = script.key(lease_key);
        invocation.arg(token);
        let _: i64 = self
            .call("release", invocation.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Drops the value, bumps its generation, and tells every process.
    pub async fn invalidate(
        &self,
        key: &str,
        generation_key: &str,
        message: &str,
        keep: Duration,
    ) -> Result<(), RedisError> {
        let mut conn = self.manager.clone();
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(key)
            .ignore()
            .incr(generation_key, 1)
            .ignore()
            .pexpire(generation_key, keep_ms)
            .ignore()
            .publish(CHANNEL, message)
            .ignore();
        // Not skipped by the breaker: an invalidation is worth a try.
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RedisError::Redis(e.to_string())),
            Err(_) => Err(RedisError::Timeout),
        }
    }

    /// Counts one request of `key` against the limit `limiter` shared by every
    /// process: `burst` requests at once, then one per `interval` (GCRA, one
    /// atomic script). The key is stored as `scaleshop:ratelimit:<limiter>:<key>`,
    /// so callers pass a short key (hashed if it could be long or personal).
    /// Every failure, including a skip while the breaker is open, counts in
    /// `cache_errors_total{op="ratelimit"}`: the caller limits in its process.
    pub async fn rate_limit(
        &self,
        limiter: &str,
        key: &str,
        interval: Duration,
        burst: u32,
    ) -> Result<RateDecision, RedisError> {
        if self.is_open() {
            metrics::counter!(scaleshop_telemetry::names::CACHE_ERRORS, "op" => "ratelimit")
                .increment(1);
            return Err(RedisError::Open);
        }
        let interval_us = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let tolerance_us = interval_us.saturating_mul(u64::from(burst.max(1) - 1));
        let mut conn = self.manager.clone();
        let mut invocation = GCRA_SCRIPT.key(format!("scaleshop:ratelimit:{limiter}:{key}"));
        invocation.arg(interval_us).arg(tolerance_us);
        let (admitted, wait_us): (i64, i64) = self
            .call("ratelimit", invocation.invoke_async(&mut conn))
            .await?;
        Ok(if admitted == 1 {
            RateDecision::Admitted
        } else {
            RateDecision::Refused {
                wait: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
            }
        })
    }

    /// PING, bounded.
    pub async fn ping(&self) -> bool {
        let mut conn = self.manager.clone();
        matches!(
            tokio::time::timeout(
                self.timeout.max(Duration::from_millis(200)),
                redis::cmd("PING").query_async::<String>(&mut conn)
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Listens to invalidations until `shutdown`; reconnects after errors.
    pub async fn subscribe(
        &self,
        on_message: impl Fn(&str) + Send + Sync + 'static,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let connect = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(CHANNEL).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(Duration::from_secs(2), connect).await {
                Ok(Ok(mut pubsub)) => {
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(message) => {
                                    if let Ok(text) = message.get_payload::<String>() {
                                        on_message(&text);
                                    }
                                }
                                None => break,
                            },
                            _ = shutdown.changed() => return,
                        }
                    }
                    tracing::debug!("cache invalidation subscription ended; reconnecting");
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cache invalidation subscription failed; retrying")
                }
                Err(_) => tracing::debug!("cache invalidation subscription timed out; retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
