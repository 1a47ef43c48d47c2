//! Operations routes: liveness, readiness, Prometheus metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use metrics_exporter_prometheus::PrometheusHandle;
use scaleshop_db::Database;
use scaleshop_telemetry::{Collector, Heartbeat};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What readiness and metrics look at.
#[derive(Clone, Default)]
pub struct Probes {
    pub db: Option<Database>,
    /// The shard databases, when configured: `shards` is `down` when one of
    /// them does not answer.
    pub shards: Option<scaleshop_db::shards::Shards>,
    /// The shared cache tier (Redis), when configured.
    pub cache: Option<scaleshop_cache::Redis>,
    /// The event dispatcher's loop, when this process runs it.
    pub bus: Option<Heartbeat>,
    /// The job workers' loops, when this process runs them.
    pub jobs: Option<Heartbeat>,
    /// Gauges computed at scrape time.
    pub collectors: Vec<Collector>,
}

struct Ops {
    probes: Probes,
    metrics: PrometheusHandle,
}

/// A background loop that has not turned for this long is down.
const LOOP_WINDOW: Duration = Duration::from_secs(10);

pub fn router(probes: Probes) -> OpenApiRouter {
    let state = Ops {
        probes,
        metrics: scaleshop_telemetry::metrics_handle(),
    };
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .with_state(Arc::new(state))
}

#[derive(Debug, Serialize, ToSchema)]
struct Health {
    status: &'static str,
}

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// State of one dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum ComponentState {
    Up,
    Down,
    Disabled,
}

#[derive(Debug, Serialize, ToSchema)]
struct Components {
    database: ComponentState,
    replicas: ComponentState,
    shards: ComponentState,
    cache: ComponentState,
    bus: ComponentState,
    jobs: ComponentState,
}

/// State of one read replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum ReplicaState {
    /// Answering and within the lag bound: gets reads.
    Up,
    /// Answering, but further behind than the bound: no reads.
    Lagging,
    /// Not answering: no reads.
    Down,
}

#[derive(Debug, Serialize, ToSchema)]
struct Readiness {
    /// `ok` when every configured dependency answers, else `unavailable`.
    status: &'static str,
    /// `replicas` is `up` when at least one replica gets reads, `down` when none
    /// does (reads go to the primary); it never makes the instance unready.
    components: Components,
    /// Each read replica (`host:port`); absent without replicas.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    replicas: BTreeMap<String, ReplicaState>,
}

/// Readiness: 200 when every configured dependency answers, else 503.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency is down", body = Readiness),
    ))]
async fn readyz(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    let database = match &ops.probes.db {
        Some(db) if db.ping(Duration::from_secs(1)).await => ComponentState::Up,
        Some(_) => ComponentState::Down,
        None => ComponentState::Disabled,
    };
    let running = |heartbeat: &Option<Heartbeat>| match heartbeat {
        Some(h) if h.alive(LOOP_WINDOW) && database == ComponentState::Up => ComponentState::Up,
        Some(_) => ComponentState::Down,
        None => ComponentState::Disabled,
    };
    let replicas: BTreeMap<String, ReplicaState> = ops
        .probes
        .db
        .iter()
        .flat_map(Database::replica_health)
        .map(|(label, health)| {
            let state = match health {
                scaleshop_db::ReplicaHealth::Up => ReplicaState::Up,
                scaleshop_db::ReplicaHealth::Lagging => ReplicaState::Lagging,
                scaleshop_db::ReplicaHealth::Down => ReplicaState::Down,
            };
            (label, state)
        })
        .collect();
    let components = Components {
        database,
        replicas: if replicas.is_empty() {
            ComponentState::Disabled
        } else if replicas.values().any(|s| *s == ReplicaState::Up) {
            ComponentState::Up
        } else {
            ComponentState::Down
        },
        shards: match &ops.probes.shards {
            Some(shards) if shards.ping(Duration::from_secs(1)).await => ComponentState::Up,
            Some(_) => ComponentState::Down,
            None => ComponentState::Disabled,
        },
        cache: match &ops.probes.cache {
            Some(redis) if redis.ping().await => ComponentState::Up,
            Some(_) => ComponentState::Down,
            None => ComponentState::Disabled,
        },
        bus: running(&ops.probes.bus),
        jobs: running(&ops.probes.jobs),
    };
    // Replicas never make the instance unready: reads fall back to the primary.
    let ready = [
        components.database,
        components.shards,
        components.cache,
        components.bus,
        components.jobs,
    ]
    .iter()
    .all(|c| *c != ComponentState::Down);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ok" } else { "unavailable" },
        components,
        replicas,
    };
    (status, Json(body))
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    if let Some(db) = &ops.probes.db {
        db.report_pool_metrics("primary");
    }
    for collect in &ops.probes.collectors {
        // Bounded: a slow database must not hang the scrape.
        let _ = tokio::time::timeout(Duration::from_secs(2), collect()).await;
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.metrics.render(),
    )
}
