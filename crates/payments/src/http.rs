//! `GET /v1/payments?order_id=` (admin): the gateway's ledger for an order.

use axum::Json;
use axum::extract::{Query, State};
use scaleshop_web::{ApiError, Caller, Paginated, Problem, ReadConsistency};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::{Currency, LedgerEntry, PaymentMethod};
use crate::service::{Payments, PaymentsError};

pub fn router(payments: Payments) -> OpenApiRouter {
    OpenApiRouter::new()
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

/// The routes other services of the deployment call (service token only).
pub fn internal_router(payments: Payments) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(accepts))
        .routes(routes!(charge))
        .with_state(payments)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct MethodQuery {
    method: String,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct Accepted {
    accepted: bool,
}

/// Is this a payment method the gateway takes? (Internal.)
#[utoipa::path(
    get, path = "/internal/payments/methods", tag = "internal", params(MethodQuery),
    security(("bearer" = [])),
    responses((status = 200, description = "Whether the method is taken", body = Accepted))
)]
async fn accepts(
    State(payments): State<Payments>,
    _caller: scaleshop_web::ServiceCaller,
    Query(query): Query<MethodQuery>,
) -> Json<Accepted> {
    // A method the API does not know is one the gateway does not take.
    let accepted = query
        .method
        .parse::<PaymentMethod>()
        .is_ok_and(|method| payments.accepts(method));
    Json(Accepted { accepted })
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct ChargeBody {
    order_id: Uuid,
    amount_cents: i64,
    currency: String,
    method: String,
    last_attempt: bool,
}

/// What a charge came to.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct ChargeAnswer {
    /// `succeeded`, `declined`, `error` (final), `transient` (nothing charged; try
    /// again), `unknown` (the provider's answer was lost; try again with the same
    /// order) or `invalid`.
    outcome: &'static str,
    detail: Option<String>,
}

fn invalid(detail: String) -> Json<ChargeAnswer> {
    Json(ChargeAnswer {
        outcome: "invalid",
        detail: Some(detail),
    })
}

/// Charge an order, once per order whatever the number of calls. (Internal.)
#[utoipa::path(
    post, path = "/internal/payments/charges", tag = "internal",
    request_body = ChargeBody, security(("bearer" = [])),
    responses((status = 200, description = "The charge's outcome", body = ChargeAnswer))
)]
async fn charge(
    State(payments): State<Payments>,
    _caller: scaleshop_web::ServiceCaller,
    Json(body): Json<ChargeBody>,
) -> Result<Json<ChargeAnswer>, ApiError> {
    let (currency, method) = match (
        body.currency.parse::<Currency>(),
        body.method.parse::<PaymentMethod>(),
    ) {
        (Ok(currency), Ok(method)) => (currency, method),
        (Err(e), _) => return Ok(invalid(format!("currency {e}"))),
        (_, Err(_)) => return Ok(invalid(format!("unknown payment method {:?}", body.method))),
    };
    let result = payments
        .charge(
            body.order_id,
            body.amount_cents,
            &currency,
            method,
            body.last_attempt,
        )
        .await;
    let (outcome, detail) = match result {
        Ok(result) => (result.as_str(), None),
        Err(PaymentsError::Transient(e)) => ("transient", Some(e)),
        Err(PaymentsError::Unknown(e)) => ("unknown", Some(e)),
        Err(PaymentsError::Invalid(e)) => ("invalid", Some(e)),
        Err(PaymentsError::Store(e)) => return Err(e.into()),
    };
    Ok(Json(ChargeAnswer { outcome, detail }))
}
