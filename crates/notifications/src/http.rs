//! `GET /v1/notifications`.

use axum::Json;
use axum::extract::{Query, State};
use scaleshop_web::page::PageParams;
use scaleshop_web::{ApiError, Caller, Page, Paginated, Problem, ReadConsistency};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::Notification;
use crate::service::Notifications;

pub fn router(notifications: Notifications) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_notifications))
        .with_state(notifications)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct NotificationsQuery {
    /// Admin: this user's notifications (default: everyone's). A customer may only
    /// name themself (anyone else: 404).
    user_id: Option<String>,
}

/// Notifications, newest first: the caller's own, or (admin) anyone's.
#[utoipa::path(
    get, path = "/v1/notifications", tag = "notifications", params(NotificationsQuery, PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Notifications", body = Paginated<Notification>),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 404, description = "Another user's", body = Problem),
    )
)]
async fn list_notifications(
    State(notifications): State<Notifications>,
    caller: Caller,
    page: Page,
    consistency: ReadConsistency,
    Query(query): Query<NotificationsQuery>,
) -> Result<Json<Paginated<Notification>>, ApiError> {
    let requested = match query.user_id.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => match Uuid::try_parse(raw) {
            Ok(id) => Some(id),
            Err(_) if caller.is_admin => {
                return Err(ApiError::invalid("user_id", "must be a UUID"));
            }
            Err(_) => return Err(ApiError::not_found()),
        },
    };
    let user_id = match (caller.is_admin, requested) {
        (true, requested) => requested,
        (false, Some(id)) if id != caller.user_id => return Err(ApiError::not_found()),
        (false, _) => Some(caller.user_id),
    };
    let before = page.after::<Uuid>()?;
    let rows = notifications
        .list(user_id, before, page.fetch(), consistency.database())
        .await?;
    Ok(Json(page.finish(rows, |n| n.id)))
}
