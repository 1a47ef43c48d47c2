//! Lists: `?limit=N` (1..=100, default 20; else 422) and `?cursor=OPAQUE`, a signed
//! value (a forged or corrupted cursor is a 400). The cursor's payload is whatever
//! the list needs to resume (a key of the last item), serialized as JSON.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};
use crate::keys::{Keys, Signer};

const PURPOSE: &str = "cursor";
pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;

/// `{"items": [...], "next_cursor": "..." | null}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Paginated<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The paging parameters of a list request.
#[derive(Debug, Clone)]
pub struct Page {
    pub limit: u32,
    cursor: Option<Vec<u8>>,
    signer: Signer,
}

impl Page {
    /// The position to resume after, if a cursor was given.
    pub fn after<T: DeserializeOwned>(&self) -> Result<Option<T>, ApiError> {
        self.cursor
            .as_deref()
            .map(|bytes| serde_json::from_slice(bytes).map_err(|_| invalid_cursor()))
            .transpose()
    }

    /// Fetch `limit + 1` rows, then call this: it trims the extra row and makes the
    /// next cursor from the last kept item.
    pub fn finish<T, K: Serialize>(&self, mut rows: Vec<T>, key: impl Fn(&T) -> K) -> Paginated<T> {
        let limit = self.limit as usize;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = if more {
            rows.last()
                .and_then(|last| serde_json::to_vec(&key(last)).ok())
                .map(|payload| self.signer.sign(PURPOSE, &payload))
        } else {
            None
        };
        Paginated {
            items: rows,
            next_cursor,
        }
    }

    /// Number of rows to fetch (one more than asked, to know if more exist).
    pub fn fetch(&self) -> i64 {
        i64::from(self.limit) + 1
    }
}

fn invalid_cursor() -> ApiError {
    ApiError::new(ErrorCode::InvalidCursor)
        .detail("the cursor is invalid; start from the first page")
}

/// Parses `limit` and `cursor` out of a raw query string.
pub fn parse(query: Option<&str>, signer: &Signer) -> Result<Page, ApiError> {
    let mut limit = DEFAULT_LIMIT;
    let mut cursor = None;
    for (name, value) in form_pairs(query.unwrap_or_default()) {
        match name.as_str() {
            "limit" => {
                limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "limit",
                            format!("must be an integer from 1 to {MAX_LIMIT}"),
                        )
                    })?;
            }
            "cursor" => {
                cursor = Some(signer.verify(PURPOSE, &value).ok_or_else(invalid_cursor)?);
            }
            _ => {}
        }
    }
    Ok(Page {
        limit,
        cursor,
        signer: signer.clone(),
    })
}

/// The `q` of a search: trimmed, at most 200 characters, no control characters
/// (422 on field `q` otherwise); `None` when absent or blank.
pub fn search_text(q: Option<&str>) -> Result<Option<String>, ApiError> {
    let Some(q) = q.map(str::trim).filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    if q.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "q",
            "must not contain control characters",
        ));
    }
    if q.chars().count() > 200 {
        return Err(ApiError::invalid("q", "must be at most 200 characters"));
    }
    Ok(Some(q.to_owned()))
}

/// Decoded `name=value` pairs of a query string.
pub fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

impl<S: Send + Sync> FromRequestParts<S> for Page {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let keys = Keys::current()?;
        let query = parts.uri.query();
        // A cursor signed by a key this process does not know yet (a rotation
        // elsewhere): learn the key first.
        if let Some(query) = query.filter(|q| q.contains("cursor=")) {
            for (name, value) in form_pairs(query) {
                if name == "cursor" {
                    keys.ensure_value_kid(&value).await;
                }
            }
        }
        parse(query, &keys.signer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_rule() {
        let s = Signer::new(b"k", "x");
        assert_eq!(parse(None, &s).unwrap().limit, 20);
        assert_eq!(parse(Some("limit=100"), &s).unwrap().limit, 100);
        for bad in ["limit=0", "limit=101", "limit=abc", "limit=-1", "limit="] {
            let e = parse(Some(bad), &s).unwrap_err();
            assert_eq!(e.code, ErrorCode::Validation, "{bad}");
            assert_eq!(e.errors[0].field, "limit");
        }
    }

    #[test]
    fn cursor_round_trip_and_forgery() {
        let s = Signer::new(b"k", "x");
        let page = parse(Some("limit=2"), &s).unwrap();
        let out = page.finish(vec![1, 2, 3], |n| *n);
        assert_eq!(out.items, vec![1, 2]);
        let cursor = out.next_cursor.unwrap();
        let next = parse(Some(&format!("cursor={cursor}")), &s).unwrap();
        assert_eq!(next.after::<i32>().unwrap(), Some(2));
        let e = parse(Some("cursor=eyJ4IjoxfQ.AAAA"), &s).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidCursor);
        assert!(page.finish(vec![1], |n| *n).next_cursor.is_none());
    }

    #[test]
    fn decodes_query() {
        assert_eq!(
            form_pairs("q=a%20b+c&x=%zz&y"),
            vec![
                ("q".into(), "a b c".into()),
                ("x".into(), "%zz".into()),
                ("y".into(), "".into())
            ]
        );
    }
}

/// The paging query parameters, for the OpenAPI document.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size, 1..=100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}
