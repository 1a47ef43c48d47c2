//! Where every measured request lands: one HDR histogram per request kind for
//! the whole run, one per kind for the current second (closed into a point of
//! the timeline every second), and counts of errors and outcomes.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Latencies are kept in microseconds, from 1 µs to this, at 3 significant digits.
const MAX_MICROS: u64 = 120 * 1_000_000;

fn histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts (low >= 1,
    // high >= 2 * low, sigfig <= 5): this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros())
        .unwrap_or(MAX_MICROS)
        .clamp(1, MAX_MICROS)
}

/// One second of one kind, as plotted over time.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TimelinePoint {
    /// Seconds since the load started (the end of this one-second window).
    pub second: u64,
    pub kind: String,
    pub count: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Default)]
struct Kind {
    total: Option<Histogram<u64>>,
    window: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    window_errors: u64,
}

#[derive(Default)]
struct State {
    kinds: BTreeMap<&'static str, Kind>,
    outcomes: BTreeMap<String, u64>,
    timeline: Vec<TimelinePoint>,
    /// Requests of every kind finished since the last tick, and their errors.
    window_count: u64,
    window_errors: u64,
    window_all: Option<Histogram<u64>>,
    send_lag: Option<Histogram<u64>>,
    dropped: u64,
}

/// What the progress line shows: the last closed second, over every kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tick {
    pub count: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Thread-safe sink of measurements (one short lock per request).
#[derive(Default)]
pub struct Recorder {
    state: Mutex<State>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A request of `kind` that succeeded after `latency`.
    pub fn ok(&self, kind: &'static str, latency: Duration) {
        self.record(kind, latency, None);
    }

    /// A request of `kind` that failed: `why` is the status code or the
    /// transport error's class (`timeout`, `connect`, ...). Its latency still
    /// counts, so that errors never make the histogram look better.
    pub fn error(&self, kind: &'static str, why: &str, latency: Duration) {
        self.record(kind, latency, Some(why));
    }

    fn record(&self, kind: &'static str, latency: Duration, error: Option<&str>) {
        let value = micros(latency);
        let mut state = self.state.lock();
        let entry = state.kinds.entry(kind).or_default();
        // `saturating_record` cannot fail: values are clamped into the bounds.
        entry
            .total
            .get_or_insert_with(histogram)
            .saturating_record(value);
        entry
            .window
            .get_or_insert_with(histogram)
            .saturating_record(value);
        if let Some(why) = error {
            *entry.errors.entry(why.to_owned()).or_default() += 1;
            entry.window_errors += 1;
            state.window_errors += 1;
        }
        state
            .window_all
            .get_or_insert_with(histogram)
            .saturating_record(value);
        state.window_count += 1;
    }

    /// A counted outcome that is not a latency (`order.completed`, `order.failed.payment_declined`).
    pub fn outcome(&self, name: &str) {
        *self
            .state
            .lock()
            .outcomes
            .entry(name.to_owned())
            .or_default() += 1;
    }

    /// How late the generator itself sent a request after its scheduled time.
    pub fn send_lag(&self, lag: Duration) {
        self.state
            .lock()
            .send_lag
            .get_or_insert_with(histogram)
            .saturating_record(micros(lag));
    }

    /// An arrival that was never sent: too many sessions were already open
    /// (`--max-sessions`). Counted as an error of the scenario.
    pub fn dropped(&self) {
        self.state.lock().dropped += 1;
    }

    /// Closes the current second: every kind's window becomes a timeline point.
    pub fn tick(&self, second: u64) -> Tick {
        let mut state = self.state.lock();
        let mut points = Vec::new();
        for (kind, entry) in &mut state.kinds {
            let errors = std::mem::take(&mut entry.window_errors);
            if let Some(window) = entry.window.take() {
                points.push(TimelinePoint {
                    second,
                    kind: (*kind).to_owned(),
                    count: window.len(),
                    errors,
                    p50_ms: ms(window.value_at_quantile(0.5)),
                    p99_ms: ms(window.value_at_quantile(0.99)),
                    max_ms: ms(window.max()),
                });
            }
        }
        state.timeline.extend(points);
        let all = state.window_all.take();
        Tick {
            count: std::mem::take(&mut state.window_count),
            errors: std::mem::take(&mut state.window_errors),
            p50_ms: all.as_ref().map_or(0.0, |h| ms(h.value_at_quantile(0.5))),
            p99_ms: all.as_ref().map_or(0.0, |h| ms(h.value_at_quantile(0.99))),
        }
    }

    /// Everything recorded, for the report.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.state.lock();
        Snapshot {
            kinds: state
                .kinds
                .iter()
                .filter_map(|(kind, entry)| {
                    entry
                        .total
                        .clone()
                        .map(|h| ((*kind).to_owned(), (h, entry.errors.clone())))
                })
                .collect(),
            outcomes: state.outcomes.clone(),
            timeline: state.timeline.clone(),
            send_lag: state.send_lag.clone(),
            dropped: state.dropped,
        }
    }
}

/// A copy of the recorder's totals.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub kinds: BTreeMap<String, (Histogram<u64>, BTreeMap<String, u64>)>,
    pub outcomes: BTreeMap<String, u64>,
    pub timeline: Vec<TimelinePoint>,
    pub send_lag: Option<Histogram<u64>>,
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_in_the_latency_and_in_their_class() {
        let recorder = Recorder::new();
        recorder.ok("product", Duration::from_millis(2));
        recorder.error("product", "503", Duration::from_millis(40));
        recorder.error("product", "503", Duration::from_millis(50));
        let tick = recorder.tick(1);
        assert_eq!((tick.count, tick.errors), (3, 2));
        let snapshot = recorder.snapshot();
        let (histogram, errors) = &snapshot.kinds["product"];
        assert_eq!(histogram.len(), 3);
        assert_eq!(errors["503"], 2);
        assert!(histogram.max() >= 49_000, "{}", histogram.max());
        assert_eq!(snapshot.timeline.len(), 1);
        assert_eq!(snapshot.timeline[0].count, 3);
        // A closed second starts the next one empty.
        assert_eq!(recorder.tick(2).count, 0);
    }
}
