//! JSON request bodies: parsed once at the edge, field by field, so that a client
//! learns every broken rule in one answer and can never set a field it does not own.
//!
//! [`JsonObject`] answers 415 for another media type, 413 past the body limit, 400
//! for malformed JSON and 422 when the body is not an object. [`Fields`] then takes
//! each known field through the domain type's parser and reports unknown fields.

use std::fmt::Display;

use axum::extract::{FromRequest, Request};
use axum::http::header;
use http_body_util::LengthLimitError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorCode, FieldError};

/// A request body that is a JSON object.
#[derive(Debug)]
pub struct JsonObject(pub Map<String, Value>);

/// A response whose body is JSON rendered earlier (a cached entry's): the bytes as
/// they are, with their content type set once (answering `Bytes` would set
/// `application/octet-stream` first, then replace it).
pub fn rendered_json(json: bytes::Bytes) -> axum::response::Response {
    let mut response = axum::response::Response::new(axum::body::Body::from(json));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// True for `application/json` and `application/*+json`, parameters allowed, in
/// any letter case.
pub fn is_json_content_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || (subtype.len() > 5
                && subtype.is_char_boundary(subtype.len() - 5)
                && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json")))
}

/// JSON bodies over this are refused with 413 (read only as far as the limit).
pub const BODY_LIMIT: usize = 1024 * 1024;

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !is_json_content_type(content_type) {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType)
                .detail("send the body as application/json"));
        }
        let bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
            .await
            .map_err(|error| {
                if error.into_inner().is::<LengthLimitError>() {
                    ApiError::new(ErrorCode::PayloadTooLarge).detail("the body is over the limit")
                } else {
                    ApiError::new(ErrorCode::MalformedRequest).detail("the body could not be read")
                }
            })?;
        parse_object(&bytes).map(Self)
    }
}

/// Parses bytes as one JSON object.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(ErrorCode::MalformedRequest).detail(format!(
            "malformed JSON at line {} column {}",
            e.line(),
            e.column()
        ))
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::invalid("", "the body must be a JSON object")),
    }
}

/// Reads the fields of a JSON object, collecting every broken rule.
///
/// ```ignore
/// let mut f = Fields::new(body);
/// let email = f.required("email", |s: String| Email::parse(&s));
/// let name = f.optional("name", |s: String| UserName::parse(&s));
/// f.finish()?; // 422 listing every error, unknown fields included
/// ```
#[derive(Debug)]
pub struct Fields {
    map: Map<String, Value>,
    errors: Vec<FieldError>,
}

impl Fields {
    pub fn new(JsonObject(map): JsonObject) -> Self {
        Self {
            map,
            errors: Vec::new(),
        }
    }

    /// A field that must be present: decoded as `T`, then parsed.
    pub fn required<T, U, E>(
        &mut self,
        name: &str,
        parse: impl FnOnce(T) -> Result<U, E>,
    ) -> Option<U>
    where
        T: DeserializeOwned,
        E: Display,
    {
        match self.map.remove(name) {
            None | Some(Value::Null) => {
                self.errors.push(FieldError::new(name, "is required"));
                None
            }
            Some(value) => self.parse(name, value, parse),
        }
    }

    /// A field that may be absent (`None`); present, it must be valid (`null` is not).
    pub fn optional<T, U, E>(
        &mut self,
        name: &str,
        parse: impl FnOnce(T) -> Result<U, E>,
    ) -> Option<Option<U>>
    where
        T: DeserializeOwned,
        E: Display,
    {
        match self.map.remove(name) {
            None => Some(None),
            Some(Value::Null) => {
                self.errors.push(FieldError::new(name, "must not be null"));
                None
            }
            Some(value) => self.parse(name, value, parse).map(Some),
        }
    }

    fn parse<T, U, E>(
        &mut self,
        name: &str,
        value: Value,
        parse: impl FnOnce(T) -> Result<U, E>,
    ) -> Option<U>
    where
        T: DeserializeOwned,
        E: Display,
    {
        let decoded = match serde_json::from_value::<T>(value) {
            Ok(decoded) => decoded,
            Err(e) => {
                self.errors.push(FieldError::new(name, type_message(&e)));
                return None;
            }
        };
        match parse(decoded) {
            Ok(parsed) => Some(parsed),
            Err(e) => {
                self.errors.push(FieldError::new(name, e.to_string()));
                None
            }
        }
    }

    /// Adds a rule broken across fields.
    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// Ok when every field was valid and none was unknown; else the 422.
    pub fn finish(mut self) -> Result<(), ApiError> {
        let mut unknown: Vec<String> = self.map.keys().cloned().collect();
        unknown.sort();
        for name in unknown {
            self.errors.push(FieldError::new(name, "unknown field"));
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.errors))
        }
    }
}

/// serde's message without its position suffix.
fn type_message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.find(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Identity parser, for fields with no rule beyond their JSON type.
pub fn any<T>(value: T) -> Result<T, std::convert::Infallible> {
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> Fields {
        match value {
            Value::Object(map) => Fields::new(JsonObject(map)),
            _ => unreachable!(),
        }
    }

    #[test]
    fn collects_every_error_and_unknown_fields() {
        let mut f = fields(json!({"a": 5, "role": "admin", "zz": 1}));
        let a: Option<String> = f.required("a", any);
        let b: Option<String> = f.required("b", any);
        assert!(a.is_none() && b.is_none());
        let err = f.finish().unwrap_err();
        let names: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(names, ["a", "b", "role", "zz"]);
        assert_eq!(err.code, ErrorCode::Validation);
    }

    #[test]
    fn optional_absent_is_fine_null_is_not() {
        let mut f = fields(json!({"n": null}));
        assert_eq!(f.optional::<String, _, _>("x", any), Some(None));
        assert_eq!(f.optional::<String, _, _>("n", any), None);
        assert!(f.finish().is_err());
    }

    #[test]
    fn content_types() {
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/merge-patch+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type(""));
        assert!(is_json_content_type("Application/JSON"));
        assert!(is_json_content_type(
            "application/Problem+JSON; charset=utf-8"
        ));
        assert!(!is_json_content_type("application/+json"));
        assert!(!is_json_content_type("text/json"));
    }
}
