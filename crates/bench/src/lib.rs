//! Benchmarks of scaleshop's hot paths, as binaries (`bench-hash`,
//! `bench-messaging`) that `scripts/bench` runs next to the HTTP benchmarks and
//! summarises in `docs/benchmarks.md`.
//!
//! Every binary goes through the product's own code (the users service's
//! `Hasher`, `scaleshop_events::append` and the `Dispatcher`,
//! `scaleshop_jobs::JobQueue` and `Workers`), never a copy of it. The machine is
//! shared and noisy: figures are medians over several runs, always shown next to
//! a baseline measured in the same run. This library holds the statistics they
//! share; nothing here measures time.

/// The median of `values` (the mean of the two middle values for an even count);
/// `None` when empty. NaNs sort last.
pub fn median(values: &[f64]) -> Option<f64> {
    let sorted = sorted(values);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The nearest-rank percentile `p` (0 < p <= 100) of `values`: the smallest value
/// with at least `p`% of the values at or below it. `None` when empty.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let sorted = sorted(values);
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil();
    // Clamped to 1..=n, so the cast and the index are in range.
    let rank = rank.clamp(1.0, n as f64) as usize;
    Some(sorted[rank - 1])
}

/// `a / b`, or `None` when `b` is zero or either is missing.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// A figure with `decimals` decimals, or `n/a`.
pub fn show(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn nearest_rank_percentile() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&values, 90.0), Some(18.0));
        assert_eq!(percentile(&values, 50.0), Some(10.0));
        assert_eq!(percentile(&values, 100.0), Some(20.0));
        assert_eq!(percentile(&[7.0], 90.0), Some(7.0));
        assert_eq!(percentile(&[], 90.0), None);
    }

    #[test]
    fn ratio_and_show() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(show(Some(1.234_56), 2), "1.23");
        assert_eq!(show(None, 2), "n/a");
    }
}
