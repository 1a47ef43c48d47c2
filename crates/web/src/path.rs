//! Path ids: anything that is not a UUID is a 404, exactly as a missing resource.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use percent_encoding::percent_decode_str;
use uuid::Uuid;

use crate::error::ApiError;
use crate::scope::RequestScope;

/// The single `{id}` of a route's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Routed by the observe layer: the id is the path's segment that starts
        // at the offset it gave, read in place (percent-decoded, as the router
        // decodes its parameters).
        if let Some(offset) = RequestScope::current_id_offset() {
            let rest = parts
                .uri
                .path()
                .get(usize::from(offset)..)
                .ok_or_else(ApiError::not_found)?;
            // One pass: where the segment ends, and whether it is encoded.
            let mut end = rest.len();
            let mut encoded = false;
            for (i, byte) in rest.bytes().enumerate() {
                match byte {
                    b'/' => {
                        end = i;
                        break;
                    }
                    b'%' => encoded = true,
                    _ => {}
                }
            }
            let raw = rest.get(..end).ok_or_else(ApiError::not_found)?;
            let parsed = if encoded {
                percent_decode_str(raw)
                    .decode_utf8()
                    .ok()
                    .and_then(|decoded| Uuid::parse_str(&decoded).ok())
            } else {
                Uuid::parse_str(raw).ok()
            };
            return parsed.map(Id).ok_or_else(ApiError::not_found);
        }
        Path::<Uuid>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Id(id))
            .map_err(|_| ApiError::not_found())
    }
}
