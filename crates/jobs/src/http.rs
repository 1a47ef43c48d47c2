//! Admin routes of the job queue.

use axum::Json;
use axum::extract::{Query, State};
use scaleshop_web::page::PageParams;
use scaleshop_web::{ApiError, Caller, Id, Page, Paginated, Problem};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::{JobQueue, JobView, Redrive, STATES};

pub fn router(queue: JobQueue) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(retry_job))
        .with_state(queue)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct JobsQuery {
    /// Only this queue (`email`, `images`, ...).
    queue: Option<String>,
    /// Only this state: `scheduled`, `running`, `completed`, `failed` or `dead`.
    state: Option<String>,
}

/// Jobs, oldest first, filtered by queue and state.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", params(JobsQuery, PageParams), security(("bearer" = [])),
    responses(
        (status = 200, description = "Jobs", body = Paginated<JobView>),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 422, description = "Unknown state or bad limit", body = Problem),
    )
)]
async fn list_jobs(
    State(queue): State<JobQueue>,
    caller: Caller,
    page: Page,
    Query(query): Query<JobsQuery>,
) -> Result<Json<Paginated<JobView>>, ApiError> {
    caller.require_admin()?;
    let state = query.state.as_deref().filter(|s| !s.is_empty());
    if let Some(state) = state
        && !STATES.contains(&state)
    {
        return Err(ApiError::invalid(
            "state",
            format!("must be one of {}", STATES.join(", ")),
        ));
    }
    let after = page.after::<Uuid>()?;
    let jobs = queue
        .list(
            query.queue.as_deref().filter(|q| !q.is_empty()),
            state,
            after,
            page.fetch(),
        )
        .await?;
    let page = page.finish(jobs, |j| j.id);
    Ok(Json(Paginated {
        items: page.items.into_iter().map(JobView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One job.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 404, description = "No such job", body = Problem),
    )
)]
async fn get_job(
    State(queue): State<JobQueue>,
    caller: Caller,
    Id(id): Id,
) -> Result<Json<JobView>, ApiError> {
    caller.require_admin()?;
    queue
        .get(id)
        .await?
        .map(|j| Json(j.into()))
        .ok_or_else(ApiError::not_found)
}

/// Redrive: a `dead` or `failed` job back to `scheduled`, due now, with fresh attempts.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/retry", tag = "jobs", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses(
        (status = 200, description = "Scheduled again", body = JobView),
        (status = 404, description = "No such job", body = Problem),
        (status = 409, description = "Neither dead nor failed", body = Problem),
    )
)]
async fn retry_job(
    State(queue): State<JobQueue>,
    caller: Caller,
    Id(id): Id,
) -> Result<Json<JobView>, ApiError> {
    caller.require_admin()?;
    match queue.retry(id).await? {
        Redrive::Scheduled(job) => Ok(Json(job.into())),
        Redrive::NotRetryable(job) => Err(ApiError::conflict(format!(
            "a {} job cannot be retried; only dead or failed ones",
            job.state
        ))),
        Redrive::Missing => Err(ApiError::not_found()),
    }
}
