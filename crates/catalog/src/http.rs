//! Catalog routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;

use scaleshop_web::page::PageParams;
use scaleshop_web::{
    ApiError, Caller, ConsistencyToken, Fields, Id, JsonObject, Page, Paginated, Problem,
    ReadConsistency, RequestKeys,
};
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::{
    Currency, Description, InitialStock, NewProduct, PriceCents, ProductName, ProductPatch, Sku,
};
use crate::{Catalog, CatalogError, Listed, ProductView};

pub fn router(catalog: Catalog) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(create_product, search_products))
        .routes(routes!(get_product, patch_product))
        .with_state(Arc::new(catalog))
}

impl From<CatalogError> for ApiError {
    fn from(error: CatalogError) -> Self {
        match error {
            CatalogError::SkuTaken => ApiError::conflict("the sku is taken"),
            CatalogError::NotFound => ApiError::not_found(),
            CatalogError::Store(e) => e.into(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing goes through Fields")]
struct CreateProductRequest {
    /// 1..=64 of `A-Z a-z 0-9 - _`.
    sku: String,
    name: String,
    description: Option<String>,
    /// 0..=100000000 minor units.
    price_cents: i64,
    /// ISO 4217.
    currency: String,
    /// 0..=1000000.
    initial_stock: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing goes through Fields")]
struct PatchProductRequest {
    name: Option<String>,
    description: Option<String>,
    price_cents: Option<i64>,
}

/// Create a product (admin).
#[utoipa::path(
    post, path = "/v1/products", tag = "catalog", request_body = CreateProductRequest, security(("bearer" = [])),
    responses(
        (status = 201, description = "Created", body = ProductView, headers(("Location" = String), ("X-Consistency-Token" = String))),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 409, description = "Sku taken", body = Problem),
        (status = 422, description = "Invalid", body = Problem),
    )
)]
async fn create_product(
    State(catalog): State<Arc<Catalog>>,
    keys: RequestKeys,
    caller: Caller,
    body: JsonObject,
) -> Result<
    (
        StatusCode,
        [(HeaderName, HeaderValue); 2],
        Json<ProductView>,
    ),
    ApiError,
> {
    caller.require_admin()?;
    let mut f = Fields::new(body);
    let sku = f.required("sku", |s: String| Sku::parse(&s));
    let name = f.required("name", |s: String| ProductName::parse(&s));
    let description = f.optional("description", |s: String| Description::parse(&s));
    let price = f.required("price_cents", PriceCents::parse);
    let currency = f.required("currency", |s: String| s.parse::<Currency>());
    let stock = f.required("initial_stock", InitialStock::parse);
    f.finish()?;
    let (
        Some(sku),
        Some(name),
        Some(description),
        Some(price_cents),
        Some(currency),
        Some(initial_stock),
    ) = (sku, name, description, price, currency, stock)
    else {
        return Err(ApiError::internal("fields checked but missing"));
    };
    let product = catalog
        .create(NewProduct {
            sku,
            name,
            description: description.unwrap_or_default(),
            price_cents,
            currency,
            initial_stock,
        })
        .await?;
    let location = HeaderValue::from_str(&format!("/v1/products/{}", product.id))
        .map_err(ApiError::internal)?;
    let token = ConsistencyToken::after_commit().await.header(&keys);
    let available = product.initial_stock.get();
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location), token],
        Json(
            Listed {
                product,
                available,
                images: Vec::new(),
            }
            .into(),
        ),
    ))
}

/// One product.
#[utoipa::path(
    get, path = "/v1/products/{id}", tag = "catalog", params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "The product", body = ProductView),
        (status = 404, description = "No such product", body = Problem),
    )
)]
async fn get_product(
    State(catalog): State<Arc<Catalog>>,
    Id(id): Id,
    consistency: ReadConsistency,
) -> Result<Response, ApiError> {
    let product = catalog
        .get_cached(id, consistency.fresh_since(), consistency.database())
        .await?;
    // The cached entry's JSON, rendered once per entry.
    let json = product.json().map_err(ApiError::internal)?;
    Ok(scaleshop_web::body::rendered_json(json))
}

/// Change name, description or price (admin).
#[utoipa::path(
    patch, path = "/v1/products/{id}", tag = "catalog", params(("id" = Uuid, Path)),
    request_body = PatchProductRequest, security(("bearer" = [])),
    responses(
        (status = 200, description = "Updated", body = ProductView),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 404, description = "No such product", body = Problem),
        (status = 422, description = "Invalid", body = Problem),
    )
)]
async fn patch_product(
    State(catalog): State<Arc<Catalog>>,
    keys: RequestKeys,
    caller: Caller,
    Id(id): Id,
    body: JsonObject,
) -> Result<([(HeaderName, HeaderValue); 1], Json<ProductView>), ApiError> {
    caller.require_admin()?;
    let mut f = Fields::new(body);
    let name = f.optional("name", |s: String| ProductName::parse(&s));
    let description = f.optional("description", |s: String| Description::parse(&s));
    let price_cents = f.optional("price_cents", PriceCents::parse);
    f.finish()?;
    let (Some(name), Some(description), Some(price_cents)) = (name, description, price_cents)
    else {
        return Err(ApiError::internal("fields checked but missing"));
    };
    let product = catalog
        .update(
            id,
            ProductPatch {
                name,
                description,
                price_cents,
            },
        )
        .await?;
    let token = ConsistencyToken::after_commit().await.header(&keys);
    Ok(([token], Json(catalog.get(product.id).await?.into())))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SearchQuery {
    /// Text matched against name, sku and description (case-insensitive).
    q: Option<String>,
}

/// Search products.
#[utoipa::path(
    get, path = "/v1/products", tag = "catalog", params(SearchQuery, PageParams),
    responses(
        (status = 200, description = "Matching products", body = Paginated<ProductView>),
        (status = 400, description = "Bad cursor", body = Problem),
        (status = 422, description = "Bad limit", body = Problem),
    )
)]
async fn search_products(
    State(catalog): State<Arc<Catalog>>,
    page: Page,
    consistency: ReadConsistency,
    Query(query): Query<SearchQuery>,
) -> Result<Json<Paginated<ProductView>>, ApiError> {
    let after = page.after::<Uuid>()?;
    let found = catalog
        .search(
            scaleshop_web::page::search_text(query.q.as_deref())?.as_deref(),
            after,
            page.fetch(),
            consistency.database(),
        )
        .await?;
    let page = page.finish(found, |l| l.product.id);
    Ok(Json(Paginated {
        items: page.items.into_iter().map(ProductView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}
