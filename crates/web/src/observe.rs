//! The outermost middleware of every route: request ids, the request timeout, the
//! latency histogram by route template, one log line per request (with the cause of
//! any 5xx), and the guarantee that every error answer is a problem document, even
//! those made outside our handlers (the router's 404 and 405, a panic's 500):
//! any error response without a JSON body becomes one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode, InternalCause};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Label for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Debug, Clone)]
pub struct ObserveSettings {
    pub request_timeout: Duration,
}

/// The route template of a response, copied from the request by [`record_route`].
#[derive(Debug, Clone)]
struct RouteTemplate(String);

/// The id of the request being served (in the request's extensions).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Apply with `Router::route_layer`: runs only for matched routes and passes the
/// template out to [`observe`], which runs before routing.
pub async fn record_route(req: Request, next: Next) -> Response {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let mut response = next.run(req).await;
    if let Some(template) = template {
        response.extensions_mut().insert(RouteTemplate(template));
    }
    response
}

/// Apply with `Router::layer` (outermost).
pub async fn observe(
    State(settings): State<Arc<ObserveSettings>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let method = method_label(req.method());
    let span = tracing::info_span!("request", request_id = %request_id, method, route = tracing::field::Empty);

    let response = async {
        match tokio::time::timeout(settings.request_timeout, next.run(req)).await {
            Ok(response) => response,
            Err(_) => ApiError::new(ErrorCode::Timeout)
                .detail("the request took too long")
                .retry_after(1)
                .into_response(),
        }
    }
    .instrument(span.clone())
    .await;

    let mut response = ensure_problem(response);
    let route = response
        .extensions()
        .get::<RouteTemplate>()
        .map_or(UNMATCHED_ROUTE.to_owned(), |t| t.0.clone());
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    metrics::histogram!(
        scaleshop_telemetry::names::HTTP_REQUEST_DURATION,
        "method" => method,
        "route" => route.clone(),
        "status" => status.to_string(),
    )
    .record(elapsed.as_secs_f64());

    span.record("route", route.as_str());
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    if let Some(InternalCause(cause)) = response.extensions().get::<InternalCause>() {
        tracing::error!(parent: &span, status, latency_ms, cause = %cause, "request failed");
    } else {
        tracing::info!(parent: &span, status, latency_ms, "request");
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Bounded label values for methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Replaces a bare error response (no problem document) with one, keeping the
/// headers that matter (`Allow`, `Retry-After`).
fn ensure_problem(response: Response) -> Response {
    let status = response.status();
    // A JSON body is a deliberate answer (a problem document, or a body the
    // contract defines for that status, such as `/readyz`'s 503): keep it.
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::body::is_json_content_type);
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = ErrorCode::from_status(status);
    let mut error = ApiError::new(code);
    if code == ErrorCode::Internal {
        error = ApiError::internal(format!("bare {status} response"));
    }
    let mut replacement = error.into_response();
    if code == ErrorCode::Internal {
        // Keep the real status (e.g. 501) when it is not one of ours.
        *replacement.status_mut() = status;
    }
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(value) = response.headers().get(&name) {
            replacement.headers_mut().insert(name, value.clone());
        }
    }
    replacement
}
