//! Telemetry: the tracing subscriber, the process-wide Prometheus recorder and the
//! name of every metric the product exports (so names live in one place and the
//! contract in `api.md` can be checked against one file).
//!
//! Rules: structured `tracing` fields, never a password, token or secret in a field;
//! metric labels have bounded cardinality (route templates, never raw paths).

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub mod trace;

pub use trace::TraceSettings;

/// Metric names, as promised by the contract.
pub mod names {
    /// Histogram: `method`, `route` (template), `status`.
    pub const HTTP_REQUEST_DURATION: &str = "http_request_duration_seconds";
    /// Calls to another service over HTTP, by `target` (service) and `outcome`
    /// (`ok`, `error`, `timeout`, `open_circuit`).
    pub const SERVICE_CLIENT_REQUESTS: &str = "service_client_requests_total";
    /// Latency of one try of a call to another service, by `target`.
    pub const SERVICE_CLIENT_DURATION: &str = "service_client_request_duration_seconds";
    /// Gauge: `pool`, `state` (`idle`, `in_use`).
    pub const DB_POOL_CONNECTIONS: &str = "db_pool_connections";
    /// Counter: `pool`; acquire attempts that timed out (answered 503).
    pub const DB_POOL_TIMEOUTS: &str = "db_pool_acquire_timeouts_total";
    /// Gauge: `replica` (host:port); how far the replica's replayed data is behind
    /// the primary, in seconds.
    pub const DB_REPLICA_LAG: &str = "db_replica_lag_seconds";
    /// Counter: reads sent to the primary because no replica was healthy or
    /// caught up.
    pub const DB_REPLICA_FALLBACK: &str = "db_replica_fallback_total";
    /// Gauge: `shard`; hash slots the shard holds in the map (present with shards).
    pub const SHARD_SLOTS: &str = "shard_slots";
    /// Gauge: the shard map's epoch as this process knows it.
    pub const SHARD_MAP_EPOCH: &str = "shard_map_epoch";
    /// Counter: reads and writes a shard refused because a move took their
    /// slot (each then read the map again and went to the new shard).
    pub const SHARD_REFUSALS: &str = "shard_refusals_total";
    /// Gauge: events committed and not yet delivered to every consumer.
    pub const OUTBOX_BACKLOG: &str = "outbox_backlog";
    /// Gauge: events committed but not yet published to NATS.
    pub const RELAY_BACKLOG: &str = "relay_backlog";
    /// Counter: events the relay published to NATS (acknowledged by the broker).
    pub const EVENTS_RELAYED: &str = "events_relayed_total";
    /// Gauge: `consumer`; events behind the head of the log.
    pub const EVENT_CONSUMER_LAG: &str = "event_consumer_lag";
    /// Gauge: `projection`; events of the log this process's read model has not
    /// applied yet (0: caught up).
    pub const PROJECTION_LAG: &str = "projection_lag";
    /// Counter: `consumer`, `outcome` (`delivered`, `duplicate`, `retried`, `dead`).
    pub const EVENT_DELIVERIES: &str = "event_deliveries_total";
    /// Counter: `outcome` (`completed`, `failed`), `reason` (`none`,
    /// `out_of_stock`, `payment_declined`, `payment_error`); orders the saga ended.
    pub const ORDER_OUTCOMES: &str = "order_outcomes_total";
    /// Gauge: `queue`, `state`.
    pub const JOBS: &str = "jobs";
    /// Counter: `queue`, `outcome` (`completed`, `retried`, `dead`).
    pub const JOB_RUNS: &str = "job_runs_total";
    /// Counter: `cache`, `tier` (`l1`, `l2`), `result` (`hit`, `miss`).
    pub const CACHE_REQUESTS: &str = "cache_requests_total";
    /// Counter: `cache`; values loaded from the database (cache misses that reached it).
    pub const CACHE_LOADS: &str = "cache_loads_total";
    /// Counter: `op`; Redis calls that failed or timed out (served from L1 or the database;
    /// `ratelimit`: also skips while the breaker is open, limited in the process).
    pub const CACHE_ERRORS: &str = "cache_errors_total";
    /// Counter: `limiter` (`login_address`, `login_email`, `signup_address`); requests refused with 429.
    pub const RATE_LIMITED: &str = "rate_limited_total";
}

/// Buckets for request latency: 0.5 ms .. 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global tracing subscriber: JSON lines when stdout is not a terminal
/// (logs are for machines then), human-readable text otherwise. `RUST_LOG` overrides
/// `default_filter`. With `traces`, spans are also exported over OTLP (see
/// [`trace`]); without, the spans that exist only for traces are off at their call
/// sites. Calling it twice is harmless (the second call does nothing); the error
/// is a trace configuration that cannot work.
pub fn init_tracing(default_filter: &str, traces: Option<&TraceSettings>) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default_filter.to_owned());
    // The spans that exist only for traces: on with traces, off at their call
    // sites without (one relaxed load each).
    let spans = if traces.is_some() { "info" } else { "off" };
    let filter = EnvFilter::try_new(format!("{filter},{}={spans}", trace::SPANS))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{}={spans}", trace::SPANS)));
    let fmt = tracing_subscriber::fmt::layer().with_target(true);
    let mut logs: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> =
        if std::io::stdout().is_terminal() {
            fmt.boxed()
        } else {
            fmt.json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .boxed()
        };
    if traces.is_some() {
        // ... and never reach the logs.
        let not_traces_only =
            tracing_subscriber::filter::filter_fn(|meta| meta.target() != trace::SPANS);
        logs = logs.with_filter(not_traces_only).boxed();
    }
    let registry = tracing_subscriber::registry().with(logs).with(filter);
    let result = match traces {
        Some(settings) => {
            // Only our own spans, never an event: logs are the logs' job.
            let ours = tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span() && meta.target().starts_with("scaleshop")
            });
            let otel = trace::layer(settings)?.with_filter(ours);
            registry.with(otel).try_init()
        }
        None => registry.try_init(),
    };
    // An error only means a subscriber is already installed (tests start many apps).
    drop(result);
    Ok(())
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. Several apps in one
/// process (tests) share it; every series carries labels that keep them apart where
/// it matters.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(names::HTTP_REQUEST_DURATION.to_owned()),
                    LATENCY_BUCKETS,
                )
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(names::SERVICE_CLIENT_DURATION.to_owned()),
                        LATENCY_BUCKETS,
                    )
                })
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    // Fails only if another recorder is installed; ours still renders.
                    drop(metrics::set_global_recorder(recorder));
                    describe();
                    handle
                }
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// HELP lines for every metric (Prometheus linters require them).
fn describe() {
    use metrics::Unit;
    metrics::describe_histogram!(
        names::HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request latency by method, route template and status."
    );
    metrics::describe_counter!(
        names::SERVICE_CLIENT_REQUESTS,
        "Calls to another service over HTTP by target service and outcome."
    );
    metrics::describe_histogram!(
        names::SERVICE_CLIENT_DURATION,
        Unit::Seconds,
        "Latency of one try of a call to another service, by target service."
    );
    metrics::describe_gauge!(
        names::DB_POOL_CONNECTIONS,
        "Database pool connections by pool and state (idle, in_use)."
    );
    metrics::describe_counter!(
        names::DB_POOL_TIMEOUTS,
        "Pool acquire attempts that timed out (answered 503)."
    );
    metrics::describe_gauge!(
        names::SHARD_SLOTS,
        "Hash slots each shard holds in the shard map."
    );
    metrics::describe_gauge!(
        names::SHARD_MAP_EPOCH,
        "The shard map's epoch as this process knows it."
    );
    metrics::describe_counter!(
        names::SHARD_REFUSALS,
        "Reads and writes a shard refused because a move took their slot."
    );
    metrics::describe_gauge!(
        names::OUTBOX_BACKLOG,
        "Events committed but not yet delivered to every consumer."
    );
    metrics::describe_gauge!(
        names::RELAY_BACKLOG,
        "Events committed but not yet published to NATS."
    );
    metrics::describe_counter!(
        names::EVENTS_RELAYED,
        "Events the relay published to NATS and the broker acknowledged."
    );
    metrics::describe_counter!(
        names::RATE_LIMITED,
        "Requests refused with 429, by limiter."
    );
    metrics::describe_gauge!(
        names::EVENT_CONSUMER_LAG,
        "Events behind the head of the log, by consumer."
    );
    metrics::describe_counter!(
        names::EVENT_DELIVERIES,
        "Event deliveries by consumer and outcome."
    );
    metrics::describe_gauge!(names::JOBS, "Jobs by queue and state.");
    metrics::describe_counter!(
        names::ORDER_OUTCOMES,
        "Orders the saga ended, by outcome (completed, failed) and failure reason."
    );
    metrics::describe_counter!(names::JOB_RUNS, "Job runs by queue and outcome.");
    metrics::describe_counter!(
        names::CACHE_REQUESTS,
        "Cache lookups by cache, tier and result."
    );
    metrics::describe_counter!(
        names::CACHE_LOADS,
        "Cache fills that read the database, by cache."
    );
    metrics::describe_counter!(
        names::CACHE_ERRORS,
        "Redis calls that failed or timed out, by operation."
    );
}

/// [`Heartbeat`]'s value for a loop parked until woken.
const PARKED: u64 = u64::MAX;

/// A liveness stamp for background loops (the event dispatcher, the job workers):
/// the loop beats on every turn (or parks while it waits for work); readiness asks
/// whether it beat recently or is parked.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Heartbeat {
    fn now_millis() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn beat(&self) {
        self.0
            .store(Self::now_millis(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The loop waits for work with nothing to do until woken (a commit, a due
    /// time): alive, however long the wait. Its next turn beats again.
    pub fn park(&self) {
        self.0.store(PARKED, std::sync::atomic::Ordering::Relaxed);
    }

    /// Did the loop beat within `window`, or is it parked?
    pub fn alive(&self, window: std::time::Duration) -> bool {
        let last = self.0.load(std::sync::atomic::Ordering::Relaxed);
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        last == PARKED || (last != 0 && Self::now_millis().saturating_sub(last) <= window)
    }
}

/// A source of gauges computed when `/metrics` is scraped (backlogs, lags, queue
/// sizes): cheap to keep exact, and nothing runs when nobody looks.
pub type Collector = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync,
>;
