//! What the handlers of a request find without a request extension: the signing
//! keys and the client's address. The observe layer sets them around every poll of
//! the request's future (a task-local scope, entered and left in place: no
//! allocation, no extra future around the router's), so extractors work with any
//! router state.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::keys::Keys;
use crate::sessions::SessionCheck;

/// The scope of one connection's requests.
#[derive(Debug, Clone, Copy)]
pub struct RequestScope {
    keys: &'static Keys,
    /// Asked by [`crate::Caller`] whether a token's session is live; none: a
    /// valid signature is enough (a process without the users service).
    sessions: Option<Sessions>,
    peer: Option<SocketAddr>,
    /// The primary database, asked for its write position when a write hands
    /// out a consistency token; none: tokens carry a time only.
    database: Option<&'static scaleshop_db::Database>,
}

tokio::task_local! {
    static CURRENT: RequestScope;
}

impl RequestScope {
    /// The scope of a server: its keys, and no client address until a connection
    /// gives one ([`RequestScope::for_peer`]).
    pub fn new(keys: Arc<Keys>) -> Self {
        // Kept for the rest of the process (one per server start), so a request
        // reads the keys without touching a shared reference count.
        let keys: &'static Arc<Keys> = Box::leak(Box::new(keys));
        Self {
            keys,
            sessions: None,
            peer: None,
            database: None,
        }
    }

    /// Consistency tokens of writes carry `database`'s write position (kept for
    /// the rest of the process, like the keys).
    pub fn with_database(self, database: scaleshop_db::Database) -> Self {
        let database: &'static scaleshop_db::Database = Box::leak(Box::new(database));
        Self {
            database: Some(database),
            ..self
        }
    }

    /// Checks every token's session with `sessions` (kept for the rest of the
    /// process, like the keys).
    pub fn with_sessions(self, sessions: Arc<dyn SessionCheck>) -> Self {
        let sessions: &'static Arc<dyn SessionCheck> = Box::leak(Box::new(sessions));
        Self {
            sessions: Some(Sessions(sessions.as_ref())),
            ..self
        }
    }

    pub(crate) fn for_peer(self, peer: SocketAddr) -> Self {
        Self {
            peer: Some(peer),
            ..self
        }
    }

    /// Runs `f` with this scope current.
    pub(crate) fn enter<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    fn current() -> Result<Self, ApiError> {
        CURRENT.try_with(|scope| *scope).map_err(|_| {
            ApiError::internal("no scope for this request: serve it through the observe layer")
        })
    }

    pub(crate) fn current_keys() -> Result<&'static Keys, ApiError> {
        Self::current().map(|scope| scope.keys)
    }

    pub(crate) fn current_database() -> Option<&'static scaleshop_db::Database> {
        CURRENT.try_with(|scope| scope.database).ok().flatten()
    }

    pub(crate) fn current_sessions() -> Result<Option<&'static dyn SessionCheck>, ApiError> {
        Self::current().map(|scope| scope.sessions.map(|s| s.0))
    }
}

/// The session check of a scope (printed by name only).
#[derive(Clone, Copy)]
struct Sessions(&'static dyn SessionCheck);

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionCheck")
    }
}

/// The address of the client's end of the connection (for limits per client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        RequestScope::current()?
            .peer
            .map(Peer)
            .ok_or_else(|| ApiError::internal("no client address: serve through a listener"))
    }
}
