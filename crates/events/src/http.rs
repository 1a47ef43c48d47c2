//! `GET /v1/events`: the log in commit order, for admins.

use axum::Json;
use axum::extract::State;
use scaleshop_web::page::PageParams;
use scaleshop_web::{ApiError, Caller, Page, Paginated};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::{Event, EventLog};

pub fn router(log: EventLog) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .with_state(log)
}

/// The event log in commit order (ascending `sequence`).
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of events", body = Paginated<Event>),
        (status = 401, description = "Not signed in", body = scaleshop_web::Problem),
        (status = 403, description = "Not an admin", body = scaleshop_web::Problem),
    )
)]
async fn list_events(
    State(log): State<EventLog>,
    caller: Caller,
    page: Page,
) -> Result<Json<Paginated<Event>>, ApiError> {
    caller.require_admin()?;
    let after = page.after::<i64>()?.unwrap_or(0);
    let rows = log.list(after, page.fetch()).await?;
    Ok(Json(page.finish(rows, |e| e.sequence)))
}
