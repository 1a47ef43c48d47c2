//! Fault injection for the sandbox gateway, for tests only: a share of the charges
//! the sandbox performs lose their answer on the way back, as a provider timeout
//! would. The charge is made (and in the ledger); the caller only learns that the
//! outcome is unknown, and must ask again with the same idempotency key.
//!
//! Off unless configured (`payments_sandbox_lost_answer_percent`, default 0).

use std::sync::atomic::{AtomicU64, Ordering};

/// Loses the answer of `percent` % of the charges it is asked about, spread evenly
/// over them (with 10 %: the 10th, 20th, 30th, ... charge), so a test knows how many
/// answers were lost.
#[derive(Debug, Default)]
pub struct LostAnswers {
    percent: u64,
    charges: AtomicU64,
}

impl LostAnswers {
    /// `percent` is capped at 100 (the configuration refuses more).
    pub fn new(percent: u8) -> Self {
        Self {
            percent: u64::from(percent.min(100)),
            charges: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.percent > 0
    }

    /// Counts one charge and says whether its answer is lost.
    pub fn lose_next(&self) -> bool {
        if self.percent == 0 {
            return false;
        }
        let n = self.charges.fetch_add(1, Ordering::Relaxed);
        // The share reached after this charge grew by a whole charge.
        (n + 1) * self.percent / 100 > n * self.percent / 100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loses_exactly_the_configured_share() {
        for percent in [0u8, 1, 10, 33, 50, 100] {
            let faults = LostAnswers::new(percent);
            let lost = (0..1000).filter(|_| faults.lose_next()).count();
            assert_eq!(lost, usize::from(percent) * 10, "{percent} %");
        }
        let tenth = LostAnswers::new(10);
        let lost: Vec<usize> = (1..=30).filter(|_| tenth.lose_next()).collect();
        assert_eq!(lost, vec![10, 20, 30]);
        assert!(!LostAnswers::new(0).enabled());
        assert!(LostAnswers::new(200).lose_next(), "capped at 100 %");
    }
}
