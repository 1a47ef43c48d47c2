//! The open-loop engine. Arrival `i` is scheduled at `start + i / rate`,
//! whatever the server does: a slow answer never delays the next arrival's
//! schedule (as a closed loop would, hiding the stall: coordinated omission).
//! Every latency counts from the scheduled time, so time spent queued behind a
//! stalled server, or waiting for one of the `connections`, is in it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::client::Target;
use crate::recorder::{Recorder, Tick};
use crate::scenario::Scenario;

/// The shape of one load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Arrivals per second.
    pub rate: f64,
    pub duration: Duration,
    /// Arrivals in progress at once (a buy holds one while it polls); an
    /// arrival beyond it is dropped and counted, never queued without bound.
    pub max_sessions: usize,
    /// How long the run waits for arrivals still in progress once the schedule
    /// has ended (or was stopped).
    pub drain: Duration,
}

impl Load {
    /// Arrivals in the whole schedule.
    pub fn arrivals(&self) -> u64 {
        // Bounded by the flags' checks (rate <= 1e6/s, duration <= 24 h).
        (self.rate * self.duration.as_secs_f64()).round() as u64
    }

    /// When arrival `i` is due, counted from the start.
    pub fn due(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }
}

/// What the engine tells whoever shows progress, once a second.
pub trait Progress: Send + Sync {
    fn second(&self, second: u64, sent: u64, tick: Tick);
}

/// No progress shown.
#[derive(Debug)]
pub struct Quiet;

impl Progress for Quiet {
    fn second(&self, _: u64, _: u64, _: Tick) {}
}

/// How a run ended.
#[derive(Debug, Clone, Copy)]
pub struct Ran {
    pub scheduled: u64,
    pub sent: u64,
    /// Arrivals still in progress when the drain ended (not in the histograms).
    pub unfinished: u64,
    pub elapsed: Duration,
    pub interrupted: bool,
}

/// Runs `load` of `scenario` against `target`, recording into `recorder`,
/// until the schedule ends or `stop` turns true.
pub async fn run(
    target: Arc<Target>,
    scenario: &Scenario,
    load: Load,
    recorder: Arc<Recorder>,
    progress: Arc<dyn Progress>,
    mut stop: watch::Receiver<bool>,
) -> Ran {
    let cycle = scenario.cycle();
    let sessions = Arc::new(Semaphore::new(load.max_sessions.max(1)));
    let scheduled = load.arrivals();
    let start = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let ticker = tokio::spawn(tick_every_second(
        start,
        recorder.clone(),
        progress,
        sent.clone(),
        done_rx,
    ));
    let mut interrupted = *stop.borrow();
    for i in 0..scheduled {
        if interrupted {
            break;
        }
        let at = start + load.due(i);
        if Instant::now() < at {
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                _ = stop.changed() => { interrupted = true; continue; }
            }
        }
        let Ok(permit) = sessions.clone().try_acquire_owned() else {
            recorder.dropped();
            continue;
        };
        recorder.send_lag(at.elapsed());
        sent.fetch_add(1, Ordering::Relaxed);
        let flow = cycle[usize::try_from(i % cycle.len() as u64).unwrap_or(0)];
        let target = target.clone();
        let recorder = recorder.clone();
        tokio::spawn(async move {
            target.run_flow(flow, at, &recorder).await;
            drop(permit);
        });
    }
    // Drain: wait (bounded) for the arrivals still in progress.
    let max = u32::try_from(load.max_sessions.max(1)).unwrap_or(u32::MAX);
    let drained = tokio::select! {
        permits = tokio::time::timeout(load.drain, sessions.acquire_many(max)) => permits.ok().and_then(Result::ok),
        _ = stop.changed(), if !interrupted => None,
    };
    let unfinished = match drained {
        Some(_) => 0,
        None => (load.max_sessions.max(1) - sessions.available_permits()) as u64,
    };
    let elapsed = start.elapsed();
    let _ = done_tx.send(true);
    let _ = ticker.await;
    Ran {
        scheduled,
        sent: sent.load(Ordering::Relaxed),
        unfinished,
        elapsed,
        interrupted: interrupted || *stop.borrow(),
    }
}

/// Closes each second of the recorder's timeline and shows it; the last,
/// partial second when `done` turns true.
async fn tick_every_second(
    start: Instant,
    recorder: Arc<Recorder>,
    progress: Arc<dyn Progress>,
    sent: Arc<AtomicU64>,
    mut done: watch::Receiver<bool>,
) {
    let mut second = 1u64;
    let mut sent_before = 0u64;
    loop {
        let finished = tokio::select! {
            () = tokio::time::sleep_until(start + Duration::from_secs(second)) => false,
            _ = done.changed() => true,
        };
        let sent_now = sent.load(Ordering::Relaxed);
        progress.second(second, sent_now - sent_before, recorder.tick(second));
        sent_before = sent_now;
        if finished {
            return;
        }
        second += 1;
    }
}
