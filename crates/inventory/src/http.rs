//! `GET /v1/inventory/{product_id}` and admin adjustments.

use axum::Json;
use axum::extract::State;
use scaleshop_web::{ApiError, Caller, Fields, Id, JsonObject, Problem};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::{Line, Reservation, Stock};
use crate::service::{Inventory, InventoryError};

pub fn router(inventory: Inventory) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(get_stock))
        .routes(routes!(adjust))
        .with_state(inventory)
}

impl From<InventoryError> for ApiError {
    fn from(error: InventoryError) -> Self {
        match error {
            InventoryError::UnknownProduct(_) => ApiError::not_found(),
            InventoryError::WouldGoNegative => {
                ApiError::conflict("the adjustment would make available negative")
            }
            InventoryError::Store(e) => e.into(),
        }
    }
}

/// Stock of a product.
#[utoipa::path(
    get, path = "/v1/inventory/{product_id}", tag = "inventory",
    params(("product_id" = uuid::Uuid, Path)),
    responses(
        (status = 200, description = "Stock", body = Stock),
        (status = 404, description = "No such product", body = Problem),
    )
)]
async fn get_stock(
    State(inventory): State<Inventory>,
    Id(product_id): Id,
) -> Result<Json<Stock>, ApiError> {
    inventory
        .get_fresh(product_id)
        .await?
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing goes through Fields")]
struct AdjustmentRequest {
    /// Added to `available` (negative removes); the result may not be negative.
    #[schema(minimum = -1_000_000_000, maximum = 1_000_000_000)]
    delta: i64,
    /// 1..=200 characters.
    #[schema(min_length = 1, max_length = 200)]
    reason: String,
}

/// Adjust stock (admin).
#[utoipa::path(
    post, path = "/v1/inventory/{product_id}/adjustments", tag = "inventory",
    params(("product_id" = uuid::Uuid, Path)), request_body = AdjustmentRequest, security(("bearer" = [])),
    responses(
        (status = 200, description = "Adjusted", body = Stock, headers(("X-Consistency-Token" = String))),
        (status = 404, description = "No such product", body = Problem),
        (status = 409, description = "Would make available negative", body = Problem),
        (status = 422, description = "Invalid", body = Problem),
    )
)]
async fn adjust(
    State(inventory): State<Inventory>,
    caller: Caller,
    Id(product_id): Id,
    keys: scaleshop_web::RequestKeys,
    body: JsonObject,
) -> Result<
    (
        [(axum::http::HeaderName, axum::http::HeaderValue); 1],
        Json<Stock>,
    ),
    ApiError,
> {
    caller.require_admin()?;
    let mut f = Fields::new(body);
    let delta = f.required("delta", |d: i64| {
        if d == 0 {
            Err("must not be 0")
        } else if d.unsigned_abs() > 1_000_000_000 {
            Err("must be between -1000000000 and 1000000000")
        } else {
            Ok(d)
        }
    });
    let reason = f.required("reason", |r: String| {
        let r = r.trim().to_owned();
        match r.chars().count() {
            0 => Err("must not be empty"),
            1..=200 => Ok(r),
            _ => Err("must be at most 200 characters"),
        }
    });
    f.finish()?;
    let (Some(delta), Some(reason)) = (delta, reason) else {
        return Err(ApiError::internal("fields checked but missing"));
    };
    let stock = inventory.adjust(product_id, delta, &reason).await?;
    let token = scaleshop_web::ConsistencyToken::after_commit()
        .await
        .header(&keys);
    Ok(([token], Json(stock)))
}

/// The routes other services of the deployment call (service token only).
pub fn internal_router(inventory: Inventory) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(reserve))
        .routes(routes!(release))
        .with_state(inventory)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct ReserveRequest {
    order_id: uuid::Uuid,
    #[schema(value_type = Vec<Object>)]
    lines: Vec<Line>,
}

/// What a reservation came to.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct ReserveAnswer {
    /// `reserved`, `out_of_stock`, `released` or `unknown_product`.
    outcome: &'static str,
    /// The product short of stock, or without a stock record.
    product_id: Option<uuid::Uuid>,
}

/// Reserve an order's lines, all or none; idempotent per order. (Internal.)
#[utoipa::path(
    post, path = "/internal/inventory/reservations", tag = "internal",
    request_body = ReserveRequest, security(("bearer" = [])),
    responses((status = 200, description = "The reservation's outcome", body = ReserveAnswer))
)]
async fn reserve(
    State(inventory): State<Inventory>,
    _caller: scaleshop_web::ServiceCaller,
    Json(request): Json<ReserveRequest>,
) -> Result<Json<ReserveAnswer>, ApiError> {
    let (outcome, product_id) = match inventory.reserve(request.order_id, &request.lines).await {
        Ok(Reservation::Reserved) => ("reserved", None),
        Ok(Reservation::OutOfStock { product_id }) => ("out_of_stock", Some(product_id)),
        Ok(Reservation::Released) => ("released", None),
        Err(InventoryError::UnknownProduct(product_id)) => ("unknown_product", Some(product_id)),
        Err(e) => return Err(e.into()),
    };
    Ok(Json(ReserveAnswer {
        outcome,
        product_id,
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct ReleaseRequest {
    order_id: uuid::Uuid,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct ReleaseAnswer {
    released: bool,
}

/// Release an order's reservation, if any; idempotent. (Internal.)
#[utoipa::path(
    post, path = "/internal/inventory/releases", tag = "internal",
    request_body = ReleaseRequest, security(("bearer" = [])),
    responses((status = 200, description = "Whether something was released", body = ReleaseAnswer))
)]
async fn release(
    State(inventory): State<Inventory>,
    _caller: scaleshop_web::ServiceCaller,
    Json(request): Json<ReleaseRequest>,
) -> Result<Json<ReleaseAnswer>, ApiError> {
    let released = inventory.release(request.order_id).await?;
    Ok(Json(ReleaseAnswer { released }))
}
