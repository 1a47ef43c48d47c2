//! Catalog routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use scaleshop_search::{Facets, Highlight, SearchQuery, Sort};
use scaleshop_web::page::PageParams;
use scaleshop_web::{
    ApiError, Caller, ConsistencyToken, FieldError, Fields, Id, JsonObject, Page, Problem,
    ReadConsistency, RequestKeys,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::{
    Currency, Description, InitialStock, NewProduct, PriceCents, ProductName, ProductPatch, Sku,
};
use crate::query::Source;
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
struct SearchParams {
    /// Words matched against name, sku and description: every word must match,
    /// exactly, as a prefix, or with one typo in words of five letters or more;
    /// letter case and accents do not matter. Ranked by relevance.
    q: Option<String>,
    /// Lowest price, inclusive (0..=100000000).
    min_price_cents: Option<String>,
    /// Highest price, inclusive (0..=100000000).
    max_price_cents: Option<String>,
    /// `true`: only products with `available` above 0.
    in_stock: Option<String>,
    /// `relevance` (the default with words), `price_asc`, `price_desc` or
    /// `newest` (the default without words).
    sort: Option<String>,
}

/// A result: the product, and where the words matched (`<mark>` in
/// HTML-escaped text).
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchItem {
    #[serde(flatten)]
    product: ProductView,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    highlight: Option<Highlight>,
}

/// A page of products; with words, filters or a sort also the number of matches
/// and the facet counts (`price`: bands with `min_price_cents`,
/// `max_price_cents` (inclusive, null for the last) and `count`;
/// `availability`: `in_stock`, `out_of_stock`), counted over every match of the
/// words whatever the filters.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchPage {
    items: Vec<SearchItem>,
    next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    facets: Option<Facets>,
}

/// Where a page of search results resumes.
#[derive(Debug, Serialize, Deserialize)]
struct SearchCursor {
    /// Results already shown.
    o: usize,
}

/// Results beyond this are not paged to (as in other search engines).
const MAX_OFFSET: usize = 10_000;
const READ_MODEL: HeaderName = HeaderName::from_static("x-read-model");

fn price_param(value: Option<&str>, field: &str, errors: &mut Vec<FieldError>) -> Option<i64> {
    let value = value?.trim();
    match value
        .parse::<i64>()
        .ok()
        .and_then(|v| PriceCents::parse(v).ok())
    {
        Some(price) => Some(price.get()),
        None => {
            errors.push(FieldError::new(
                field,
                "must be an integer in 0..=100000000",
            ));
            None
        }
    }
}

/// Search products.
#[utoipa::path(
    get, path = "/v1/products", tag = "catalog", params(SearchParams, PageParams),
    responses(
        (status = 200, description = "Matching products", body = SearchPage,
         headers(("X-Read-Model" = String, description = "`projection` (the search index and the product listing) or `command` (the products table)"))),
        (status = 400, description = "Bad cursor", body = Problem),
        (status = 422, description = "Bad limit or filter", body = Problem),
    )
)]
async fn search_products(
    State(catalog): State<Arc<Catalog>>,
    page: Page,
    consistency: ReadConsistency,
    Query(params): Query<SearchParams>,
) -> Result<Response, ApiError> {
    let text = scaleshop_web::page::search_text(params.q.as_deref())?;
    let mut errors = Vec::new();
    let min_price_cents = price_param(
        params.min_price_cents.as_deref(),
        "min_price_cents",
        &mut errors,
    );
    let max_price_cents = price_param(
        params.max_price_cents.as_deref(),
        "max_price_cents",
        &mut errors,
    );
    if let (Some(min), Some(max)) = (min_price_cents, max_price_cents)
        && min > max
    {
        errors.push(FieldError::new(
            "max_price_cents",
            "must not be below min_price_cents",
        ));
    }
    let in_stock = match params.in_stock.as_deref().map(str::trim) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            errors.push(FieldError::new("in_stock", "must be true or false"));
            false
        }
    };
    let sort = match params.sort.as_deref().map(str::trim) {
        None => None,
        Some(s) => match s.parse::<Sort>() {
            Ok(sort) => Some(sort),
            Err(()) => {
                errors.push(FieldError::new(
                    "sort",
                    "must be relevance, price_asc, price_desc or newest",
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(ApiError::validation(errors));
    }
    let searching = text.is_some()
        || min_price_cents.is_some()
        || max_price_cents.is_some()
        || in_stock
        || sort.is_some();
    if !searching {
        // Every product, in the order they were made, paged by id.
        let after = page.after::<Uuid>()?;
        let (found, source) = catalog
            .list(after, page.fetch(), consistency.database())
            .await?;
        let page = page.finish(found, |l| l.product.id);
        let mut response = Json(SearchPage {
            items: page
                .items
                .into_iter()
                .map(|l| SearchItem {
                    product: l.into(),
                    highlight: None,
                })
                .collect(),
            next_cursor: page.next_cursor,
            total: None,
            facets: None,
        })
        .into_response();
        response
            .headers_mut()
            .insert(READ_MODEL, read_model(source));
        return Ok(response);
    }
    let offset = page.after::<SearchCursor>()?.map_or(0, |c| c.o);
    if offset > MAX_OFFSET {
        return Err(ApiError::invalid(
            "cursor",
            "results beyond 10000 are not paged to",
        ));
    }
    let found = catalog
        .find(
            SearchQuery {
                text,
                min_price_cents,
                max_price_cents,
                in_stock,
                sort: sort.unwrap_or_default(),
                offset,
                limit: usize::try_from(page.fetch()).unwrap_or(21),
            },
            consistency.database(),
        )
        .await?;
    let rows: Vec<(usize, SearchItem)> = found
        .items
        .into_iter()
        .enumerate()
        .map(|(i, (listed, highlight))| {
            (
                offset + i + 1,
                SearchItem {
                    product: listed.into(),
                    highlight,
                },
            )
        })
        .collect();
    let page = page.finish(rows, |(shown, _)| SearchCursor { o: *shown });
    let mut response = Json(SearchPage {
        items: page.items.into_iter().map(|(_, item)| item).collect(),
        next_cursor: page.next_cursor,
        total: Some(found.total),
        facets: Some(found.facets),
    })
    .into_response();
    response
        .headers_mut()
        .insert(READ_MODEL, read_model(found.source));
    Ok(response)
}

fn read_model(source: Source) -> HeaderValue {
    HeaderValue::from_static(match source {
        Source::Projection => "projection",
        Source::CommandSide => "command",
    })
}
