//! Events of the users service.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

/// `user.created`: an account exists (sign-up, or the admin account made at start).
/// Carries what consumers need to reach the user (the notification service keeps
/// its own directory of addresses from it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCreated {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    /// `customer` or `admin`.
    pub role: String,
}
contract!(UserCreated, "user.created", 1);

/// `user.updated`: an account changed; the whole account as it is now, and the
/// fields that changed (`email`, `name`, `password`, `role`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserUpdated {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    pub role: String,
    pub changed: Vec<String>,
}
contract!(UserUpdated, "user.updated", 1);

/// `session.ended`: a token was signed out (aggregate: the user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnded {
    pub user_id: Uuid,
    /// The signed-out token's id (its `jti`).
    pub session_id: Uuid,
}
contract!(SessionEnded, "session.ended", 1);
