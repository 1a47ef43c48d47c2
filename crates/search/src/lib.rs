//! The product search projection, the query side of the catalog: a tantivy index
//! on this process's local disk, built only from events (`product.*` and the
//! stock changes of `inventory.*`) read from the log in order, one commit per
//! batch with the log position as the commit's payload. It answers ranked,
//! typo-tolerant, prefix and accent-folded searches with price and stock filters,
//! facet counts and highlights (`query`); the catalog's search route asks it and
//! falls back to the command side when it cannot answer in time. `index` is one
//! generation of the index, `projection` the follower, the token wait and the
//! rebuild (the admin routes of `/v1/projections` are the composition root's).
//!
//! It never reads a service's tables: what it knows comes in the events.

pub mod index;
pub mod projection;
pub mod query;

pub use projection::{ProductSearch, State, Status};
pub use query::{Facets, Highlight, Hit, SearchHits, SearchQuery, Sort};

use std::path::Path;

use scaleshop_db::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("search index: {0}")]
    Index(String),
    #[error("search index folder {path}: {message}")]
    Io { path: String, message: String },
    #[error("search index of another version: {0}")]
    Stale(String),
    #[error("event {sequence} cannot be applied to the search index: {message}")]
    Event { sequence: i64, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SearchError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

impl From<tantivy::TantivyError> for SearchError {
    fn from(e: tantivy::TantivyError) -> Self {
        Self::Index(e.to_string())
    }
}
