//! The users service: accounts (the write side of the user model), passwords hashed
//! with argon2id, sessions as signed tokens that end (sign-out, a password change:
//! [`sessions`]), and the `user.created` / `user.updated` / `session.ended`
//! events appended with every write.
//!
//! Layers: [`domain`] (types that cannot hold a bad value) <- [`service`] (use
//! cases, over the [`store::UserStore`] port) <- [`http`] (routes). Only `store`
//! names sqlx; only `http` names axum. This crate never reads another service's
//! tables.

pub mod domain;
pub mod hashing;
pub mod http;
pub mod service;
pub mod sessions;
pub mod store;

pub use service::{ChangedBy, SignedIn, Users, UsersError};
pub use sessions::Sessions;
