//! Path ids: anything that is not a UUID is a 404, exactly as a missing resource.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use uuid::Uuid;

use crate::error::ApiError;

/// The single path parameter of a route (`{id}`, `{product_id}`, ...), a UUID.
/// Whatever else the path holds there (not a UUID, badly percent-encoded) answers
/// 404 `not_found`, on every route, as an id that names nothing does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Id(id))
            .map_err(|_| ApiError::not_found())
    }
}
