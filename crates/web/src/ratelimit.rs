//! Keyed rate limits (GCRA) that answer 429 with `Retry-After`. Used for
//! brute-force protection of sign-in and sign-up: per client address and per
//! account.
//!
//! In one process the state lives in memory (`governor`). Behind a gateway with
//! several instances each would admit its own quota, so a [`SharedLimiter`] (the
//! composition root plugs Redis in) keeps the same GCRA in one place for every
//! process. When it fails or times out, the request is limited in this process
//! instead: the limiter degrades, it never fails the request.

use std::fmt::{self, Display};
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorCode};

/// The quota of a limiter: `burst` requests at once, then one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub interval: Duration,
    pub burst: NonZeroU32,
}

/// What a shared limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admitted,
    /// Refused; the key's next request is admitted after `wait`.
    Refused {
        wait: Duration,
    },
}

/// Why a shared limiter could not decide (unreachable, timed out).
pub type SharedLimitError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed future of a shared decision.
pub type SharedFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Decision, SharedLimitError>> + Send + 'a>>;

/// GCRA state shared by every process (same semantics as the in-process
/// limiter). `limiter` names the limit and `key` is already short and opaque (a
/// hash): implementations store it under their own namespace.
pub trait SharedLimiter: Send + Sync + 'static {
    fn check<'a>(&'a self, limiter: &'a str, key: &'a str, rate: Rate) -> SharedFuture<'a>;
}

/// A limiter over keys of type `K`; `name` labels the `rate_limited_total` metric
/// (and the shared state's namespace).
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    name: &'static str,
    rate: Rate,
    limiter: DefaultKeyedRateLimiter<K>,
    shared: Option<Arc<dyn SharedLimiter>>,
    /// Whether the current outage of `shared` was logged.
    warned: AtomicBool,
}

impl<K: Hash + Eq + Clone> fmt::Debug for KeyedLimit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimit")
            .field("name", &self.name)
            .field("rate", &self.rate)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone + Display> KeyedLimit<K> {
    /// `per_minute` requests per minute for each key, in bursts of at most that many.
    pub fn per_minute(name: &'static str, per_minute: NonZeroU32) -> Self {
        let quota = Quota::per_minute(per_minute);
        Self {
            name,
            rate: Rate {
                interval: quota.replenish_interval(),
                burst: quota.burst_size(),
            },
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            shared: None,
            warned: AtomicBool::new(false),
        }
    }

    /// Keeps the state in `shared` (every process sees the same limit); the
    /// in-process state then only serves while `shared` fails. `None` keeps it
    /// in this process.
    #[must_use]
    pub fn shared(mut self, shared: Option<Arc<dyn SharedLimiter>>) -> Self {
        self.shared = shared;
        self
    }

    /// Counts one request for `key`; a 429 when over the limit.
    pub async fn check(&self, key: &K) -> Result<(), ApiError> {
        if let Some(shared) = &self.shared {
            match shared.check(self.name, &opaque(key), self.rate).await {
                Ok(decision) => {
                    if self.warned.swap(false, Ordering::Relaxed) {
                        tracing::info!(limiter = self.name, "shared rate limit available again");
                    }
                    return match decision {
                        Decision::Admitted => Ok(()),
                        Decision::Refused { wait } => Err(self.refused(wait)),
                    };
                }
                // The key's value is never logged (it may be an email); one
                // warning per outage and limiter, the rest at debug (the count
                // is in `cache_errors_total{op="ratelimit"}`).
                Err(error) => {
                    if self.warned.swap(true, Ordering::Relaxed) {
                        tracing::debug!(limiter = self.name, %error, "shared rate limit unavailable");
                    } else {
                        tracing::warn!(
                            limiter = self.name,
                            %error,
                            "shared rate limit unavailable; limiting in this process"
                        );
                    }
                }
            }
        }
        self.limiter.check_key(key).map_err(|not_until| {
            self.refused(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    fn refused(&self, wait: Duration) -> ApiError {
        metrics::counter!(scaleshop_telemetry::names::RATE_LIMITED, "limiter" => self.name)
            .increment(1);
        ApiError::new(ErrorCode::RateLimited)
            .detail("too many attempts; wait before trying again")
            .retry_after(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
    }

    /// Forgets keys that are back under their limit (bounds memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// A short key that reveals nothing of `key` (an email, an address): 128 bits of
/// its SHA-256, in hex.
fn opaque(key: &impl Display) -> String {
    let digest = Sha256::digest(key.to_string().as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_after_burst_with_retry_after() {
        let limit = KeyedLimit::per_minute("t", NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            limit.check(&"a").await.unwrap();
        }
        let e = limit.check(&"a").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.retry_after.unwrap() >= 1);
        limit.check(&"b").await.unwrap();
    }

    #[test]
    fn the_rate_is_the_governor_quota() {
        let limit: KeyedLimit<String> = KeyedLimit::per_minute("t", NonZeroU32::new(6).unwrap());
        assert_eq!(limit.rate.interval, Duration::from_secs(10));
        assert_eq!(limit.rate.burst.get(), 6);
    }

    #[test]
    fn opaque_keys_are_short_stable_and_hide_the_value() {
        let a = opaque(&"someone@example.com");
        assert_eq!(a.len(), 32);
        assert_eq!(a, opaque(&"someone@example.com".to_owned()));
        assert_ne!(a, opaque(&"someone.else@example.com"));
        assert!(!a.contains("someone"));
    }
}
