//! `GET /v1/payments?order_id=` (admin): the gateway's ledger for an order.

use axum::Json;
use axum::extract::{Query, State};
use scaleshop_web::routes::{ServiceRouter, ServiceRoutes};
use scaleshop_web::{ApiError, Caller, Paginated, Problem, ReadConsistency};
use serde::Deserialize;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::{LedgerEntry, Payments};

pub fn router(payments: Payments) -> ServiceRoutes {
    ServiceRouter::new()
        .routes(routes!(list_payments))
        .with_state(payments)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PaymentsQuery {
    /// The order whose charge attempts to list (required).
    order_id: Option<String>,
}

/// Ledger entries of an order's charge attempts (admin).
#[utoipa::path(
    get, path = "/v1/payments", tag = "payments", params(PaymentsQuery), security(("bearer" = [])),
    responses(
        (status = 200, description = "Ledger entries", body = Paginated<LedgerEntry>),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 422, description = "order_id missing or not a UUID", body = Problem),
    )
)]
async fn list_payments(
    State(payments): State<Payments>,
    caller: Caller,
    consistency: ReadConsistency,
    Query(query): Query<PaymentsQuery>,
) -> Result<Json<Paginated<LedgerEntry>>, ApiError> {
    caller.require_admin()?;
    let order_id = query
        .order_id
        .as_deref()
        .ok_or_else(|| ApiError::invalid("order_id", "is required"))
        .and_then(|raw| {
            Uuid::try_parse(raw).map_err(|_| ApiError::invalid("order_id", "must be a UUID"))
        })?;
    let items = payments.ledger(order_id, consistency.database()).await?;
    Ok(Json(Paginated {
        items,
        next_cursor: None,
    }))
}
