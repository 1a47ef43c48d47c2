//! The port through which the [`crate::Caller`] extractor asks whether a token's
//! session is still live, after its signature and claims have checked out: the
//! account may be gone, the token may have been signed out, or a password change
//! may have ended every session issued before it.
//!
//! The users service implements it (with a cache, so a request does not read the
//! database); the composition root hands it to the request scope
//! ([`crate::RequestScope::with_sessions`]). This crate knows no more of it.

use std::future::Future;
use std::pin::Pin;

use uuid::Uuid;

use crate::auth::Caller;
use crate::error::ApiError;

/// What a token says of its session (its claims beyond the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// The token's id (`jti`): what signing out refuses from then on.
    pub id: Uuid,
    /// The user's session epoch when the token was issued (`sv`): a password
    /// change moves the epoch on, which ends every token of an earlier one.
    pub epoch: i64,
    /// When the token expires (`exp`, seconds since the epoch): after that it is
    /// refused anyway, so nothing needs to remember it.
    pub expires_at: i64,
}

/// A boxed future of a session check.
pub type SessionFuture<'a> = Pin<Box<dyn Future<Output = Result<bool, ApiError>> + Send + 'a>>;

/// Decides whether the session of a correctly signed, unexpired token is live.
pub trait SessionCheck: Send + Sync + 'static {
    /// `Ok(true)` while the caller's account exists and its session has not
    /// ended; `Ok(false)` makes the request a 401. An error (the store is
    /// unreachable) answers as that error.
    fn is_live<'a>(&'a self, caller: &'a Caller) -> SessionFuture<'a>;
}
