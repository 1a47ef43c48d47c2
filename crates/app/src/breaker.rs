//! A circuit breaker per target service: after `failures` failed tries in a row
//! the breaker opens and calls fail at once for `open_for`; then one trial call
//! goes through (half-open): its success closes the breaker, its failure opens it
//! again. Time is passed in, so the state machine is tested without sleeping.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial call is in flight; others fail fast meanwhile.
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
    failures: u32,
    open_for: Duration,
}

/// Why a call was not let through: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub retry_after: Duration,
}

impl Breaker {
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Self {
            state: State::Closed { failures: 0 },
            failures: failures.max(1),
            open_for,
        }
    }

    /// May a call go through now?
    pub fn admit(&mut self, now: Instant) -> Result<(), Rejected> {
        match self.state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                Ok(())
            }
            State::Open { until } => Err(Rejected {
                retry_after: until - now,
            }),
            State::HalfOpen => Err(Rejected {
                retry_after: self.open_for,
            }),
        }
    }

    pub fn success(&mut self) {
        self.state = State::Closed { failures: 0 };
    }

    pub fn failure(&mut self, now: Instant) {
        self.state = match self.state {
            State::Closed { failures } if failures + 1 < self.failures => State::Closed {
                failures: failures + 1,
            },
            State::Closed { .. } | State::HalfOpen | State::Open { .. } => State::Open {
                until: now + self.open_for,
            },
        };
    }

    #[cfg(test)]
    fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_secs(2);

    #[test]
    fn opens_after_the_failures_in_a_row_and_fails_fast() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(3, OPEN);
        for _ in 0..2 {
            breaker.admit(t0).unwrap();
            breaker.failure(t0);
        }
        // A success in between starts the count again.
        breaker.admit(t0).unwrap();
        breaker.success();
        for _ in 0..2 {
            breaker.admit(t0).unwrap();
            breaker.failure(t0);
        }
        assert!(!breaker.is_open());
        breaker.admit(t0).unwrap();
        breaker.failure(t0);
        assert!(breaker.is_open());
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(
            breaker.admit(t1),
            Err(Rejected {
                retry_after: Duration::from_millis(1500)
            })
        );
    }

    #[test]
    fn half_open_lets_one_trial_through_and_its_outcome_decides() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(1, OPEN);
        breaker.failure(t0);
        let later = t0 + OPEN;
        breaker.admit(later).unwrap();
        // Only one trial at a time.
        assert!(breaker.admit(later).is_err());
        breaker.failure(later);
        assert_eq!(
            breaker.admit(later + Duration::from_secs(1)),
            Err(Rejected {
                retry_after: Duration::from_secs(1)
            })
        );
        let again = later + OPEN;
        breaker.admit(again).unwrap();
        breaker.success();
        assert!(!breaker.is_open());
        breaker.admit(again).unwrap();
        breaker.admit(again).unwrap();
    }
}
