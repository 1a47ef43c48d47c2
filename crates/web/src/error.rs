//! The one error table, and problem documents (RFC 9457).
//!
//! Every error a client can see is an [`ErrorCode`]: its HTTP status, problem type
//! and title are written once, in [`ErrorCode::spec`]. Internal causes (SQL errors,
//! IO) travel in the response as an extension, are logged by [`crate::observe`] with
//! the request id, and never reach the body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use scaleshop_db::StoreError;
use serde::Serialize;

/// Media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every error the API can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    MalformedRequest,
    InvalidCursor,
    Validation,
    Unauthenticated,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    Unavailable,
    Timeout,
    Internal,
}

impl ErrorCode {
    /// The table: status, problem type (a path under `/problems/`), title.
    pub const fn spec(self) -> (StatusCode, &'static str, &'static str) {
        use ErrorCode as E;
        match self {
            E::MalformedRequest => (
                StatusCode::BAD_REQUEST,
                "malformed-request",
                "Malformed request",
            ),
            E::InvalidCursor => (
                StatusCode::BAD_REQUEST,
                "invalid-cursor",
                "Invalid cursor or token",
            ),
            E::Validation => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Validation failed",
            ),
            E::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Authentication required",
            ),
            E::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            E::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            E::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            E::Conflict => (StatusCode::CONFLICT, "conflict", "Conflict"),
            E::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Request body too large",
            ),
            E::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            E::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            E::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            E::Timeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "Request timed out",
            ),
            E::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }

    /// The code a bare response with this status stands for (used to turn responses
    /// made outside our handlers, such as the router's 405, into problem documents).
    pub fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::MalformedRequest,
            401 => Self::Unauthenticated,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            409 => Self::Conflict,
            413 => Self::PayloadTooLarge,
            415 => Self::UnsupportedMediaType,
            422 => Self::Validation,
            429 => Self::RateLimited,
            503 => Self::Unavailable,
            408 | 504 => Self::Timeout,
            _ => Self::Internal,
        }
    }
}

/// One broken rule of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// The body field or query parameter.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An RFC 9457 problem document, as serialized.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// The cause of a 5xx, kept for the log; found in the response's extensions.
#[derive(Debug, Clone)]
pub struct InternalCause(pub String);

/// An error on its way to becoming a problem document.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: Option<String>,
    pub errors: Vec<FieldError>,
    pub retry_after: Option<u64>,
    cause: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            detail: None,
            errors: Vec::new(),
            retry_after: None,
            cause: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound)
    }

    pub fn unauthenticated() -> Self {
        Self::new(ErrorCode::Unauthenticated)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict).detail(detail)
    }

    /// A 422 with one entry per broken rule.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let mut error = Self::new(ErrorCode::Validation)
            .detail("the request breaks one or more rules; see errors");
        error.errors = errors;
        error
    }

    /// A 422 for one field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError::new(field, message)])
    }

    /// A 500 whose cause is logged, never shown.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let mut error = Self::new(ErrorCode::Internal);
        error.cause = Some(cause.to_string());
        error
    }

    pub fn unavailable() -> Self {
        Self::new(ErrorCode::Unavailable)
            .detail("a dependency is busy or unreachable; try again shortly")
            .retry_after(1)
    }

    pub fn problem(&self) -> Problem {
        let (status, kind, title) = self.code.spec();
        Problem {
            kind: format!("/problems/{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: self.detail.clone(),
            errors: self.errors.clone(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (status, kind, _) = self.code.spec();
        write!(f, "{status} {kind}")
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.problem();
        let (status, ..) = self.code.spec();
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if self.code == ErrorCode::Unauthenticated {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(cause) = self.cause {
            response.extensions_mut().insert(InternalCause(cause));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable => Self::unavailable(),
            StoreError::Conflict(_) => Self::conflict("the resource already exists"),
            StoreError::Other(cause) => Self::internal(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_statuses_round_trip() {
        for code in [
            ErrorCode::MalformedRequest,
            ErrorCode::Validation,
            ErrorCode::Unauthenticated,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Conflict,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::RateLimited,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_status(code.spec().0), code);
        }
    }

    #[test]
    fn internal_cause_is_not_in_the_body() {
        let error = ApiError::internal("SELECT * FROM users failed at /src/x.rs");
        let body = serde_json::to_string(&error.problem()).unwrap();
        assert!(!body.contains("SELECT"));
        assert!(body.contains("\"status\":500"));
    }
}
