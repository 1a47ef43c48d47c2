//! Keyed rate limits (GCRA, through `governor`) that answer 429 with `Retry-After`.
//! Used for brute-force protection of sign-in: per client address and per account.

use std::hash::Hash;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::error::{ApiError, ErrorCode};

/// A limiter over keys of type `K`; `name` labels the `rate_limited_total` metric.
#[derive(Debug)]
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    name: &'static str,
    limiter: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `per_minute` requests per minute for each key, in bursts of at most that many.
    pub fn per_minute(name: &'static str, per_minute: NonZeroU32) -> Self {
        Self {
            name,
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_minute)),
        }
    }

    /// Counts one request for `key`; a 429 when over the limit.
    pub fn check(&self, key: &K) -> Result<(), ApiError> {
        self.limiter.check_key(key).map_err(|not_until| {
            metrics::counter!(scaleshop_telemetry::names::RATE_LIMITED, "limiter" => self.name)
                .increment(1);
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::new(ErrorCode::RateLimited)
                .detail("too many attempts; wait before trying again")
                .retry_after(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
        })
    }

    /// Forgets keys that are back under their limit (bounds memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_after_burst_with_retry_after() {
        let limit = KeyedLimit::per_minute("t", NonZeroU32::new(3).unwrap());
        for _ in 0..3 {
            limit.check(&"a").unwrap();
        }
        let e = limit.check(&"a").unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.retry_after.unwrap() >= 1);
        limit.check(&"b").unwrap();
    }
}
