//! Image routes: add an image to a product (raw bytes or a `source_url`; its own
//! 10 MiB body limit), read an image, and serve a variant's bytes (strong ETag,
//! `If-None-Match` -> 304, immutable caching).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use scaleshop_web::body::{is_json_content_type, parse_object};
use scaleshop_web::{
    ApiError, Caller, ConsistencyToken, ErrorCode, Fields, Id, JsonObject, Problem, RequestKeys,
};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::domain::MediaType;
use crate::service::{ImageView, MAX_UPLOAD_BYTES, Media, MediaError};

/// The longest `source_url` taken.
const MAX_URL_LEN: usize = 2048;

/// JSON bodies keep the API's usual limit on this route too.
const JSON_LIMIT: usize = 1024 * 1024;

/// Variants never change once written (a new upload is a new image).
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";

pub fn router(media: Media) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(add_image))
        // Only the routes above: the rest of the API keeps the 1 MiB limit.
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .routes(routes!(get_image))
        .routes(routes!(get_variant))
        .with_state(media)
}

impl From<MediaError> for ApiError {
    fn from(error: MediaError) -> Self {
        match error {
            MediaError::ProductNotFound | MediaError::NotFound => ApiError::not_found(),
            MediaError::Refused(refusal) => ApiError::invalid("source_url", refusal.to_string()),
            MediaError::Empty => ApiError::invalid("body", "must not be empty"),
            MediaError::Storage(e) => {
                tracing::error!(error = %e, "image storage failed");
                ApiError::unavailable()
            }
            MediaError::Store(e) => e.into(),
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "documents the body; parsing goes through Fields")]
struct SourceUrlRequest {
    /// An http(s) URL of a PNG, JPEG or WebP image on a public address.
    source_url: String,
}

async fn read_body(request: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, &())
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge)
                    .detail("the body is over the 10 MiB limit")
            } else {
                ApiError::new(ErrorCode::MalformedRequest).detail("the body could not be read")
            }
        })
}

/// Add an image to a product (admin): the file's bytes, or `{"source_url"}` to
/// fetch. Processing is asynchronous: poll `GET /v1/images/{id}`.
#[utoipa::path(
    post, path = "/v1/products/{id}/images", tag = "images", params(("id" = Uuid, Path)),
    request_body(
        description = "The image file (at most 10 MiB), or a JSON object naming a URL to fetch",
        content(("image/png"), ("image/jpeg"), ("image/webp"), (SourceUrlRequest = "application/json")),
    ),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted, processing", body = ImageView, headers(("Location" = String), ("X-Consistency-Token" = String))),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 404, description = "No such product", body = Problem),
        (status = 413, description = "Over 10 MiB", body = Problem),
        (status = 415, description = "Not PNG, JPEG, WebP or JSON", body = Problem),
        (status = 422, description = "Invalid or refused source_url", body = Problem),
    )
)]
async fn add_image(
    State(media): State<Media>,
    keys: RequestKeys,
    caller: Caller,
    Id(product_id): Id,
    request: Request,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 2], Json<ImageView>), ApiError> {
    caller.require_admin()?;
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let image = if is_json_content_type(&content_type) {
        let body = read_body(request).await?;
        if body.len() > JSON_LIMIT {
            return Err(
                ApiError::new(ErrorCode::PayloadTooLarge).detail("a JSON body is limited to 1 MiB")
            );
        }
        let mut f = Fields::new(JsonObject(parse_object(&body)?));
        let source_url = f.required("source_url", |s: String| {
            if s.trim().is_empty() {
                Err("must not be empty")
            } else if s.len() > MAX_URL_LEN {
                Err("must be at most 2048 characters")
            } else {
                Ok(s)
            }
        });
        f.finish()?;
        let Some(source_url) = source_url else {
            return Err(ApiError::internal("fields checked but missing"));
        };
        media.upload_from(product_id, &source_url).await?
    } else if MediaType::parse(&content_type).is_some() {
        let body = read_body(request).await?;
        media.upload(product_id, body).await?
    } else {
        return Err(ApiError::new(ErrorCode::UnsupportedMediaType).detail(
            "send the file as image/png, image/jpeg or image/webp, or {\"source_url\"} as application/json",
        ));
    };
    let location =
        HeaderValue::from_str(&format!("/v1/images/{}", image.id)).map_err(ApiError::internal)?;
    let token = ConsistencyToken::after_commit().await.header(&keys);
    Ok((
        StatusCode::ACCEPTED,
        [(LOCATION, location), token],
        Json(ImageView::from(&image)),
    ))
}

/// One image: its status, and its variants once `ready`.
#[utoipa::path(
    get, path = "/v1/images/{id}", tag = "images", params(("id" = Uuid, Path)),
    responses(
        (status = 200, description = "The image", body = ImageView),
        (status = 404, description = "No such image", body = Problem),
    )
)]
async fn get_image(State(media): State<Media>, Id(id): Id) -> Result<Json<ImageView>, ApiError> {
    Ok(Json(ImageView::from(&media.get(id).await?)))
}

/// Whether `If-None-Match` names `etag` (weak comparison, as RFC 9110 asks).
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// A variant's bytes (`thumb`, `medium`); 404 until the image is `ready`.
#[utoipa::path(
    get, path = "/v1/images/{id}/{variant}", tag = "images",
    params(("id" = Uuid, Path), ("variant" = String, Path, description = "thumb or medium")),
    responses(
        (status = 200, description = "The bytes", content(("image/png"), ("image/jpeg")),
            headers(("ETag" = String), ("Cache-Control" = String))),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 404, description = "No such image or variant, or not ready", body = Problem),
    )
)]
async fn get_variant(
    State(media): State<Media>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(Path((id, name))) = path else {
        return Err(ApiError::not_found());
    };
    let id = Uuid::try_parse(&id).map_err(|_| ApiError::not_found())?;
    let variant = media.variant(id, &name).await?;
    let etag = format!("\"{}\"", variant.etag);
    let etag_header = HeaderValue::from_str(&etag).map_err(ApiError::internal)?;
    let cache = HeaderValue::from_static(IMMUTABLE);
    if none_match(&headers, &etag) {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(ETAG, etag_header), (CACHE_CONTROL, cache)],
        )
            .into_response());
    }
    let content_type = HeaderValue::from_str(&variant.content_type).map_err(ApiError::internal)?;
    let bytes = media.variant_bytes(&variant).await?;
    Ok((
        StatusCode::OK,
        [
            (CONTENT_TYPE, content_type),
            (ETAG, etag_header),
            (CACHE_CONTROL, cache),
            (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_forms() {
        let etag = "\"abc\"";
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(IF_NONE_MATCH, HeaderValue::from_static(value));
            none_match(&headers, etag)
        };
        assert!(with("\"abc\""));
        assert!(with("W/\"abc\""));
        assert!(with("\"x\", \"abc\""));
        assert!(with("*"));
        assert!(!with("\"abd\""));
        assert!(!with("abc"));
        assert!(!none_match(&HeaderMap::new(), etag));
    }
}
