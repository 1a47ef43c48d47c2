//! Time for persisted schedules (retry times, leases, run times): microsecond
//! precision on both backends, and the exponential backoff with jitter used by the
//! event dispatcher and the job queue.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, SubsecRound, Utc};

/// Now, truncated to what both backends store (microseconds).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Now, in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// Now plus `duration`.
pub fn after(duration: Duration) -> DateTime<Utc> {
    now() + chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

/// The delay after the `attempt`-th failure (1-based): `min * 2^(attempt-1)` capped
/// at `max`, plus a random jitter of up to the same again (backon's exponential
/// backoff), so retries of many failures spread out.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let steps = usize::try_from(attempt.max(1)).unwrap_or(usize::MAX);
    ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(steps - 1)
        .unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds_and_caps() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 1..=12u32 {
            for _ in 0..50 {
                let d = backoff(min, max, attempt);
                let base = (min * 2u32.pow(attempt - 1)).min(max);
                assert!(d >= base, "attempt {attempt}: {d:?} < {base:?}");
                assert!(d <= base * 2, "attempt {attempt}: {d:?} > {:?}", base * 2);
            }
        }
    }
}
