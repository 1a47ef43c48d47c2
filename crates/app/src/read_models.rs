//! Admin routes of the read models (CQRS projections) this process keeps: their
//! state (`GET /v1/projections`) and a rebuild from the log
//! (`POST /v1/projections/{name}/rebuild`, what `scaleshop projections rebuild`
//! calls). Two kinds: the search index on this process's disk
//! (`scaleshop_search`), rebuilt into a new generation while the old one
//! serves; and projections in tables (`scaleshop_events::projection`), rebuilt
//! into a new copy of their tables while the old one serves, then swapped.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use scaleshop_db::Database;
use scaleshop_events::projection::{self, Projection};
use scaleshop_events::{DispatcherSettings, EventLog};
use scaleshop_search::{ProductSearch, SearchError};
use scaleshop_web::{ApiError, Caller, Problem};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What this process keeps.
#[derive(Clone)]
pub struct ReadModels {
    pub db: Database,
    pub settings: DispatcherSettings,
    pub index: Option<ProductSearch>,
    pub tables: Vec<Arc<dyn Projection>>,
}

pub fn router(models: ReadModels) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_projections))
        .routes(routes!(rebuild_projection))
        .with_state(Arc::new(models))
}

/// A read model's state, whichever kind it is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ReadModelStatus {
    name: &'static str,
    /// `catching_up` (the search index at start), `live`, `rebuilding` or
    /// `stuck`.
    state: &'static str,
    /// The last event of the log applied.
    position: i64,
    /// Events of the log not applied yet.
    lag: i64,
    /// Documents (the index) or rows (a table).
    documents: u64,
    /// SHA-256 of every document or row in key order: equal for equal read
    /// models.
    digest: String,
    /// The search index's serving generation (its folder).
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<String>,
    /// Why it is stuck, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// A table's rebuild, while it runs: how far its new copy has got.
    #[serde(skip_serializing_if = "Option::is_none")]
    rebuild: Option<projection::Progress>,
}

impl From<scaleshop_search::Status> for ReadModelStatus {
    fn from(s: scaleshop_search::Status) -> Self {
        use scaleshop_search::State;
        Self {
            name: s.name,
            state: match s.state {
                State::CatchingUp => "catching_up",
                State::Live => "live",
                State::Rebuilding => "rebuilding",
                State::Stuck => "stuck",
            },
            position: s.position,
            lag: s.lag,
            documents: s.documents,
            digest: s.digest,
            generation: Some(s.generation),
            error: s.error,
            rebuild: None,
        }
    }
}

impl From<projection::Status> for ReadModelStatus {
    fn from(s: projection::Status) -> Self {
        use projection::State;
        Self {
            name: s.name,
            state: match s.state {
                State::Live => "live",
                State::Rebuilding => "rebuilding",
                State::Stuck => "stuck",
            },
            position: s.position,
            lag: s.lag,
            documents: s.documents,
            digest: s.digest,
            generation: None,
            error: s.error,
            rebuild: s.rebuild,
        }
    }
}

/// `{"items": [Status]}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Projections {
    items: Vec<ReadModelStatus>,
}

fn search_error(error: SearchError) -> ApiError {
    match error {
        SearchError::Store(e) => e.into(),
        other => ApiError::internal(other),
    }
}

impl ReadModels {
    async fn index_status(&self, index: &ProductSearch) -> Result<ReadModelStatus, ApiError> {
        let log = EventLog::new(self.db.clone());
        Ok(index.status(&log).await.map_err(search_error)?.into())
    }

    async fn all(&self) -> Result<Vec<ReadModelStatus>, ApiError> {
        let mut items = Vec::new();
        if let Some(index) = &self.index {
            items.push(self.index_status(index).await?);
        }
        for table in &self.tables {
            items.push(projection::status(&self.db, table.as_ref()).await?.into());
        }
        Ok(items)
    }
}

/// The read models this process keeps, with their position and lag.
#[utoipa::path(
    get, path = "/v1/projections", tag = "projections", security(("bearer" = [])),
    responses(
        (status = 200, description = "The projections", body = Projections),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 403, description = "Not an admin", body = Problem),
    )
)]
async fn list_projections(
    State(models): State<Arc<ReadModels>>,
    caller: Caller,
) -> Result<Json<Projections>, ApiError> {
    caller.require_admin()?;
    Ok(Json(Projections {
        items: models.all().await?,
    }))
}

/// Builds a projection again from the whole log (202: it runs in the
/// background; watch `state`). The search index is built into a new generation
/// while the old one serves, then swapped; a table likewise into a new copy of
/// its tables (`state` is `rebuilding`, `rebuild` its progress) while the old
/// copy answers reads, then swapped. Asked while a rebuild of it runs, it is
/// that rebuild.
#[utoipa::path(
    post, path = "/v1/projections/{name}/rebuild", tag = "projections",
    params(("name" = String, Path, description = "`product-search`, `product-listing` or `order-history`")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Rebuild started", body = ReadModelStatus),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 404, description = "No such projection here", body = Problem),
    )
)]
async fn rebuild_projection(
    State(models): State<Arc<ReadModels>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<ReadModelStatus>), ApiError> {
    caller.require_admin()?;
    if let Some(index) = models
        .index
        .as_ref()
        .filter(|_| name == scaleshop_search::projection::NAME)
    {
        index.request_rebuild();
        return Ok((
            StatusCode::ACCEPTED,
            Json(models.index_status(index).await?),
        ));
    }
    let table = models
        .tables
        .iter()
        .find(|t| t.name() == name)
        .cloned()
        .ok_or_else(|| ApiError::not_found().detail("no such projection here"))?;
    // `None`: a rebuild of it runs already (here or in another process).
    if let Some(rebuild) =
        projection::begin_rebuild(&models.db, table.clone(), models.settings.clone()).await?
    {
        // `run` logs how it ends; a rebuild that stops is taken over later.
        tokio::spawn(async move {
            let _ = rebuild.run().await;
        });
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(projection::status(&models.db, table.as_ref()).await?.into()),
    ))
}
