//! Admin routes of the event log: the log itself (`GET /v1/events`), the events
//! parked as dead per consumer, and their redelivery.

use axum::Json;
use axum::extract::{Path, Query, State};
use scaleshop_web::page::PageParams;
use scaleshop_web::{ApiError, Caller, Page, Paginated, Problem};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::dispatch::{DeadEvent, DeadEvents};
use crate::{Event, EventLog};

#[derive(Clone)]
struct EventsHttp {
    log: EventLog,
    dead: DeadEvents,
}

pub fn router(log: EventLog, dead: DeadEvents) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .routes(routes!(list_dead))
        .routes(routes!(redeliver))
        .with_state(EventsHttp { log, dead })
}

/// The event log in commit order (ascending `sequence`).
#[utoipa::path(
    get, path = "/v1/events", tag = "events", params(PageParams), security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of events", body = Paginated<Event>),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 403, description = "Not an admin", body = Problem),
    )
)]
async fn list_events(
    State(http): State<EventsHttp>,
    caller: Caller,
    page: Page,
) -> Result<Json<Paginated<Event>>, ApiError> {
    caller.require_admin()?;
    let after = page.after::<i64>()?.unwrap_or(0);
    let rows = http.log.list(after, page.fetch()).await?;
    Ok(Json(page.finish(rows, |e| e.sequence)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DeadQuery {
    /// Only this consumer's dead events.
    consumer: Option<String>,
}

/// Events parked as dead after their last attempt, per consumer.
#[utoipa::path(
    get, path = "/v1/events/dead", tag = "events", params(DeadQuery, PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Dead events", body = Paginated<DeadEvent>),
        (status = 403, description = "Not an admin", body = Problem),
    )
)]
async fn list_dead(
    State(http): State<EventsHttp>,
    caller: Caller,
    page: Page,
    Query(query): Query<DeadQuery>,
) -> Result<Json<Paginated<DeadEvent>>, ApiError> {
    caller.require_admin()?;
    let after = page.after::<(i64, String)>()?;
    let rows = http
        .dead
        .list(query.consumer.as_deref(), after, page.fetch())
        .await?;
    Ok(Json(
        page.finish(rows, |d| (d.sequence, d.consumer.clone())),
    ))
}

/// Delivers a dead event to its consumer once more (the inbox still prevents a
/// second effect). 404 when no such dead event; 409 when it is not `dead`.
#[utoipa::path(
    post, path = "/v1/events/dead/{consumer}/{event_id}/redeliver", tag = "events",
    params(("consumer" = String, Path), ("event_id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Redelivery requested", body = DeadEvent),
        (status = 404, description = "No such dead event", body = Problem),
        (status = 409, description = "Not dead", body = Problem),
    )
)]
async fn redeliver(
    State(http): State<EventsHttp>,
    caller: Caller,
    Path((consumer, event_id)): Path<(String, String)>,
) -> Result<Json<DeadEvent>, ApiError> {
    caller.require_admin()?;
    let event_id = Uuid::try_parse(&event_id).map_err(|_| ApiError::not_found())?;
    if !http.dead.redeliver(&consumer, event_id).await? {
        return match http.dead.get(&consumer, event_id).await? {
            Some(_) => Err(ApiError::conflict("the event is not dead")),
            None => Err(ApiError::not_found()),
        };
    }
    http.dead
        .get(&consumer, event_id)
        .await?
        .map(Json)
        .ok_or_else(ApiError::not_found)
}
