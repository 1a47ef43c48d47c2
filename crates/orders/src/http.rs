//! Order routes.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use scaleshop_web::page::PageParams;
use scaleshop_web::{
    ApiError, Caller, ConsistencyToken, FieldError, Id, JsonObject, Keys, Page, Paginated, Problem,
    ReadConsistency, RequestKeys,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::{
    Currency, FailureReason, Order, OrderLine, PaymentMethod, PlaceOrder, Quantity, Status,
    WantedLine,
};
use crate::history::{OrderRecord, TimelineEntry};
use crate::idempotency::{Claim, KeyRef, Stored};
use crate::service::{Orders, OrdersError};

pub fn router(orders: Orders) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(create_order, list_orders))
        .routes(routes!(get_order))
        .routes(routes!(cancel_order))
        .with_state(orders)
}

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The refusal of a payment method the API or the gateway does not take.
const UNKNOWN_PAYMENT_METHOD: &str = "is not a payment method we take";

impl From<OrdersError> for ApiError {
    fn from(error: OrdersError) -> Self {
        match error {
            OrdersError::NotFound => ApiError::not_found(),
            OrdersError::UnknownProducts(unknown) => ApiError::validation(
                unknown
                    .into_iter()
                    .map(|(i, id)| {
                        FieldError::new(
                            format!("items[{i}].product_id"),
                            format!("no product {id}"),
                        )
                    })
                    .collect(),
            ),
            OrdersError::MixedCurrencies => {
                ApiError::invalid("items", "all products of an order must share one currency")
            }
            OrdersError::UnknownPaymentMethod => {
                ApiError::invalid("payment_method", UNKNOWN_PAYMENT_METHOD)
            }
            OrdersError::NotCancellable => ApiError::conflict(
                "only a pending order whose payment has not started can be cancelled",
            ),
            OrdersError::UnknownUser => {
                ApiError::unauthenticated().detail("the account no longer exists")
            }
            OrdersError::Unavailable {
                service,
                retry_after_secs,
            } => ApiError::unavailable()
                .detail(format!(
                    "the {service} service is unavailable; try again shortly"
                ))
                .retry_after(retry_after_secs),
            OrdersError::Store(e) => e.into(),
        }
    }
}

/// An order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: Status,
    pub items: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: Currency,
    /// Set when failed.
    pub failure_reason: Option<FailureReason>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Each status the order has had, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

impl From<OrderRecord> for OrderView {
    fn from(order: OrderRecord) -> Self {
        Self {
            id: order.id,
            user_id: order.user_id,
            status: order.status,
            items: order.items,
            total_cents: order.total_cents,
            currency: order.currency,
            failure_reason: order.failure_reason,
            created_at: order.created_at,
            updated_at: order.updated_at,
            timeline: order.timeline,
        }
    }
}

impl From<Order> for OrderView {
    fn from(order: Order) -> Self {
        OrderRecord::from(order).into()
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing is by hand")]
struct LineRequest {
    product_id: Uuid,
    /// 1..=1000.
    quantity: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing is by hand")]
struct CreateOrderRequest {
    /// 1..=50 lines.
    items: Vec<LineRequest>,
    /// A sandbox token: `pm_card_visa`, `pm_card_mastercard`, `pm_card_chargeDeclined`, `pm_card_processingError`.
    payment_method: PaymentMethod,
}

/// Parses the body, collecting every broken rule.
fn parse_order(
    user_id: Uuid,
    body: &serde_json::Map<String, Value>,
) -> Result<PlaceOrder, ApiError> {
    let mut errors = Vec::new();
    for key in body.keys() {
        if key != "items" && key != "payment_method" {
            errors.push(FieldError::new(key.clone(), "unknown field"));
        }
    }
    let mut lines = Vec::new();
    match body.get("items") {
        None | Some(Value::Null) => errors.push(FieldError::new("items", "is required")),
        Some(Value::Array(items)) if items.is_empty() || items.len() > 50 => {
            errors.push(FieldError::new("items", "must hold 1 to 50 lines"));
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Value::Object(item) = item else {
                    errors.push(FieldError::new(format!("items[{i}]"), "must be an object"));
                    continue;
                };
                for key in item.keys() {
                    if key != "product_id" && key != "quantity" {
                        errors.push(FieldError::new(
                            format!("items[{i}].{key}"),
                            "unknown field",
                        ));
                    }
                }
                let product = match item.get("product_id") {
                    Some(Value::String(s)) => match Uuid::try_parse(s) {
                        Ok(id) => Some(id),
                        Err(_) => {
                            errors.push(FieldError::new(
                                format!("items[{i}].product_id"),
                                "must be a UUID",
                            ));
                            None
                        }
                    },
                    _ => {
                        errors.push(FieldError::new(
                            format!("items[{i}].product_id"),
                            "is required (a UUID string)",
                        ));
                        None
                    }
                };
                let quantity = match item.get("quantity").and_then(Value::as_i64) {
                    Some(q) => match Quantity::parse(q) {
                        Ok(q) => Some(q),
                        Err(e) => {
                            errors.push(FieldError::new(
                                format!("items[{i}].quantity"),
                                e.to_string(),
                            ));
                            None
                        }
                    },
                    None => {
                        errors.push(FieldError::new(
                            format!("items[{i}].quantity"),
                            "is required (an integer)",
                        ));
                        None
                    }
                };
                if let (Some(product_id), Some(quantity)) = (product, quantity) {
                    lines.push(WantedLine {
                        product_id,
                        quantity,
                    });
                }
            }
        }
        Some(_) => errors.push(FieldError::new("items", "must be an array")),
    }
    let payment_method = match body.get("payment_method") {
        Some(Value::String(s)) if !s.is_empty() => match s.parse::<PaymentMethod>() {
            Ok(method) => Some(method),
            Err(_) => {
                errors.push(FieldError::new("payment_method", UNKNOWN_PAYMENT_METHOD));
                None
            }
        },
        _ => {
            errors.push(FieldError::new("payment_method", "is required (a string)"));
            None
        }
    };
    match payment_method {
        Some(payment_method) if errors.is_empty() => Ok(PlaceOrder {
            user_id,
            lines,
            payment_method,
        }),
        _ => Err(ApiError::validation(errors)),
    }
}

async fn stored_response(stored: &Stored, replayed: bool, keys: &Keys) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        "application/problem+json"
    };
    let mut response = (status, stored.body.clone()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(location) = stored
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        headers.insert(header::LOCATION, location);
    }
    if status.is_success() {
        let (name, value) = ConsistencyToken::after_commit().await.header(keys);
        headers.insert(name, value);
    }
    if replayed {
        headers.insert(REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// Place an order (asynchronous: 202 `pending`; the processor completes or fails it).
#[utoipa::path(
    post, path = "/v1/orders", tag = "orders", request_body = CreateOrderRequest, security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the first response is replayed")),
    responses(
        (status = 202, description = "Accepted", body = OrderView, headers(("Location" = String), ("X-Consistency-Token" = String))),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 409, description = "The same key is in flight", body = Problem),
        (status = 422, description = "Invalid, or the key was used with another body", body = Problem),
    )
)]
async fn create_order(
    State(orders): State<Orders>,
    keys: RequestKeys,
    caller: Caller,
    headers: HeaderMap,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let key = match headers.get(&IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::invalid("Idempotency-Key", "must be 1 to 255 visible characters")
                })?;
            Some(KeyRef {
                user_id: caller.user_id,
                key: key.to_owned(),
            })
        }
    };
    let JsonObject(map) = body;
    let mut claimed = None;
    if let Some(key) = &key {
        let hash = hex::encode(Sha256::digest(serde_json::to_vec(&map).unwrap_or_default()));
        match orders.idempotency.claim(key, &hash).await? {
            Claim::Proceed(claim) => claimed = Some(claim),
            Claim::Replay(stored) => return Ok(stored_response(&stored, true, &keys).await),
            Claim::InFlight => {
                return Err(ApiError::conflict(
                    "a request with this Idempotency-Key is in progress",
                ));
            }
            Claim::Mismatch => {
                return Err(ApiError::invalid(
                    "Idempotency-Key",
                    "was already used with a different request body",
                ));
            }
        }
    }
    let outcome = async {
        let request = parse_order(caller.user_id, &map)?;
        let order = orders.price(&request).await?;
        let stored = orders
            .place(&order, key.as_ref(), |order| Stored {
                status: 202,
                location: Some(format!("/v1/orders/{}", order.id)),
                body: serde_json::to_string(&OrderView::from(order.clone())).unwrap_or_default(),
            })
            .await?;
        Ok::<Stored, ApiError>(stored)
    }
    .await;
    match (outcome, &key) {
        (Ok(stored), _) => Ok(stored_response(&stored, false, &keys).await),
        (Err(error), Some(key)) if error.code.spec().0.is_client_error() => {
            // A refusal is the first response too: replay it.
            let stored = Stored {
                status: error.code.spec().0.as_u16(),
                location: None,
                body: serde_json::to_string(&error.problem()).unwrap_or_default(),
            };
            orders.idempotency.complete(key, &stored).await?;
            Err(error)
        }
        (Err(error), Some(key)) => {
            if let Some(claimed) = claimed {
                orders.idempotency.abandon(key, claimed).await;
            }
            Err(error)
        }
        (Err(error), None) => Err(error),
    }
}

/// One order (owner or admin; anyone else's is a 404).
#[utoipa::path(
    get, path = "/v1/orders/{id}", tag = "orders", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 404, description = "No such order", body = Problem),
    )
)]
async fn get_order(
    State(orders): State<Orders>,
    caller: Caller,
    Id(id): Id,
    consistency: ReadConsistency,
) -> Result<Json<OrderView>, ApiError> {
    let order = orders.read_record(id, consistency.database()).await?;
    if !caller.may_access(order.user_id) {
        return Err(ApiError::not_found());
    }
    Ok(Json(order.into()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Admin: this user's orders. A customer may only name themself (else 404).
    user_id: Option<String>,
}

/// The caller's orders, newest first.
#[utoipa::path(
    get, path = "/v1/orders", tag = "orders", params(ListQuery, PageParams), security(("bearer" = [])),
    responses(
        (status = 200, description = "Orders", body = Paginated<OrderView>),
        (status = 404, description = "Another user's", body = Problem),
    )
)]
async fn list_orders(
    State(orders): State<Orders>,
    caller: Caller,
    page: Page,
    consistency: ReadConsistency,
    Query(query): Query<ListQuery>,
) -> Result<Json<Paginated<OrderView>>, ApiError> {
    let user_id = match query.user_id.as_deref().filter(|s| !s.is_empty()) {
        None => caller.user_id,
        Some(raw) => {
            let id = Uuid::try_parse(raw).map_err(|_| {
                if caller.is_admin {
                    ApiError::invalid("user_id", "must be a UUID")
                } else {
                    ApiError::not_found()
                }
            })?;
            if !caller.may_access(id) {
                return Err(ApiError::not_found());
            }
            id
        }
    };
    let before = page.after::<Uuid>()?;
    let rows = orders
        .list_records(user_id, before, page.fetch(), consistency.database())
        .await?;
    let page = page.finish(rows, |o| o.id);
    Ok(Json(Paginated {
        items: page.items.into_iter().map(OrderView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Cancel a pending order (owner or admin); 409 once processed or being charged.
#[utoipa::path(
    post, path = "/v1/orders/{id}/cancel", tag = "orders", params(("id" = Uuid, Path)), security(("bearer" = [])),
    responses(
        (status = 200, description = "Cancelled", body = OrderView),
        (status = 404, description = "No such order", body = Problem),
        (status = 409, description = "Not cancellable", body = Problem),
    )
)]
async fn cancel_order(
    State(orders): State<Orders>,
    keys: RequestKeys,
    caller: Caller,
    Id(id): Id,
) -> Result<([(HeaderName, HeaderValue); 1], Json<OrderView>), ApiError> {
    let order = orders.get(id).await?;
    if !caller.may_access(order.user_id) {
        return Err(ApiError::not_found());
    }
    let order = orders.cancel(id).await?;
    Ok((
        [ConsistencyToken::after_commit().await.header(&keys)],
        Json(order.into()),
    ))
}
