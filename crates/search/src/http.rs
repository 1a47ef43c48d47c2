//! Admin routes of the projections this process keeps: their state
//! (`GET /v1/projections`) and a rebuild from the log
//! (`POST /v1/projections/{name}/rebuild`, what `scaleshop projections rebuild`
//! calls).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use scaleshop_events::EventLog;
use scaleshop_web::{ApiError, Caller, Problem};
use serde::Serialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::projection::{NAME, ProductSearch, Status};

#[derive(Clone)]
struct ProjectionsHttp {
    search: ProductSearch,
    log: EventLog,
}

pub fn router(search: ProductSearch, log: EventLog) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_projections))
        .routes(routes!(rebuild_projection))
        .with_state(ProjectionsHttp { search, log })
}

/// `{"items": [Status]}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Projections {
    items: Vec<Status>,
}

impl From<crate::SearchError> for ApiError {
    fn from(error: crate::SearchError) -> Self {
        match error {
            crate::SearchError::Store(e) => e.into(),
            other => ApiError::internal(other),
        }
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
    State(http): State<ProjectionsHttp>,
    caller: Caller,
) -> Result<Json<Projections>, ApiError> {
    caller.require_admin()?;
    Ok(Json(Projections {
        items: vec![http.search.status(&http.log).await?],
    }))
}

/// Builds the projection again from the whole log, serving from the old one
/// meanwhile, then swaps (202: it runs in the background; watch `state`).
#[utoipa::path(
    post, path = "/v1/projections/{name}/rebuild", tag = "projections",
    params(("name" = String, Path, description = "`product-search`")), security(("bearer" = [])),
    responses(
        (status = 202, description = "Rebuild started", body = Status),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 404, description = "No such projection", body = Problem),
    )
)]
async fn rebuild_projection(
    State(http): State<ProjectionsHttp>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Status>), ApiError> {
    caller.require_admin()?;
    if name != NAME {
        return Err(ApiError::not_found().detail("no such projection"));
    }
    http.search.request_rebuild();
    Ok((
        StatusCode::ACCEPTED,
        Json(http.search.status(&http.log).await?),
    ))
}
