//! The shared rate limits: the web kit's GCRA port, kept in Redis (the cache's
//! connection, its timeouts and breaker).

use scaleshop_cache::{RateDecision, Redis};
use scaleshop_web::ratelimit::{Decision, Rate, SharedFuture, SharedLimiter};

/// Limits every process shares through Redis.
#[derive(Debug, Clone)]
pub struct RedisLimits(pub Redis);

impl SharedLimiter for RedisLimits {
    fn check<'a>(&'a self, limiter: &'a str, key: &'a str, rate: Rate) -> SharedFuture<'a> {
        Box::pin(async move {
            match self
                .0
                .rate_limit(limiter, key, rate.interval, rate.burst.get())
                .await?
            {
                RateDecision::Admitted => Ok(Decision::Admitted),
                RateDecision::Refused { wait } => Ok(Decision::Refused { wait }),
            }
        })
    }
}
