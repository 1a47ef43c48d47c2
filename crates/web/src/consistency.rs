//! Read-your-writes: every successful write answers with `X-Consistency-Token`; a
//! read that sends it back sees that write or something newer, whatever serves it.
//!
//! The token is signed (so it cannot be forged into something the server would
//! misread) and carries a time taken after the write committed (microseconds since
//! the epoch) and, with read replicas, the primary's WAL position read after the
//! commit. The cache bypasses any entry whose data may be older than that time;
//! the database sends the read to a replica that has replayed that position, or
//! after a bounded wait to the primary. So a read with the token sees the write.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorCode};
use crate::keys::{Keys, Signer};
use crate::scope::RequestScope;

pub const CONSISTENCY_HEADER: HeaderName = HeaderName::from_static("x-consistency-token");
const PURPOSE: &str = "consistency";

/// A position in the history of writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConsistencyToken {
    /// Commit time of the write, in microseconds since the Unix epoch.
    #[serde(rename = "t")]
    pub at_micros: i64,
    /// The primary's WAL position after the write (with read replicas only).
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
}

impl ConsistencyToken {
    pub fn at(time: DateTime<Utc>) -> Self {
        Self {
            at_micros: time.timestamp_micros(),
            position: None,
        }
    }

    /// For a write that has committed: now, and the primary's write position when
    /// the request's database has read replicas. Anything read at or after this
    /// time from the primary saw the write, so a cache entry loaded earlier is
    /// bypassed; a replica serves it only once it has replayed the position.
    pub async fn after_commit() -> Self {
        let mut token = Self::at(Utc::now());
        if let Some(db) = RequestScope::current_database() {
            token.position = db.write_position().await.map(|p| p.0);
        }
        token
    }

    /// What a read with this token needs from the database.
    pub fn consistency(&self) -> scaleshop_db::Consistency {
        scaleshop_db::Consistency::after(self.position)
    }

    pub fn encode(&self, signer: &Signer) -> String {
        signer.sign(PURPOSE, &serde_json::to_vec(self).unwrap_or_default())
    }

    pub fn decode(value: &str, signer: &Signer) -> Option<Self> {
        serde_json::from_slice(&signer.verify(PURPOSE, value)?).ok()
    }

    /// The response header that carries this token.
    pub fn header(&self, keys: &Keys) -> (HeaderName, HeaderValue) {
        let value = HeaderValue::from_str(&self.encode(&keys.signer))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        (CONSISTENCY_HEADER, value)
    }
}

/// The token a read sent, if any. A token that does not verify is a 400.
#[derive(Debug, Clone, Copy)]
pub struct ReadConsistency(pub Option<ConsistencyToken>);

impl ReadConsistency {
    /// What the read needs from the database: the token's position, or anything
    /// a healthy replica holds.
    pub fn database(&self) -> scaleshop_db::Consistency {
        self.0
            .map_or(scaleshop_db::Consistency::Eventual, |t| t.consistency())
    }

    /// The token's time (µs), for the cache.
    pub fn fresh_since(&self) -> Option<i64> {
        self.0.map(|t| t.at_micros)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ReadConsistency {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(&CONSISTENCY_HEADER) else {
            return Ok(Self(None));
        };
        let keys = Keys::current()?;
        let value = value.to_str().ok().map(str::trim);
        if let Some(value) = value {
            keys.ensure_value_kid(value).await;
        }
        value
            .and_then(|v| ConsistencyToken::decode(v, &keys.signer))
            .map(|token| Self(Some(token)))
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidCursor)
                    .detail("X-Consistency-Token is not a token this service issued")
            })
    }
}
