//! The HTTP kit: the conventions of `api.md` implemented once, used by every route
//! of every service.
//!
//! - [`error`]: the one error table ([`ErrorCode`]) and RFC 9457 problem documents.
//! - [`body`]: JSON bodies parsed field by field, unknown fields refused, every broken
//!   rule reported.
//! - [`auth`]: HS256 bearer tokens and the [`Caller`] extractor.
//! - [`sessions`]: the port the [`Caller`] asks whether a token's session is still
//!   live (implemented by the users service, wired by the composition root).
//! - [`page`]: signed opaque cursors and the `limit` rule.
//! - [`consistency`]: `X-Consistency-Token` for read-your-writes.
//! - [`ratelimit`]: keyed rate limiters answering 429 with `Retry-After`.
//! - [`openapi`]: the answers every route shares, added to the OpenAPI document.
//! - [`routes`]: a service's routes, documented (OpenAPI) and dispatchable by
//!   observe.
//! - [`observe`]: request ids, timeouts, the latency histogram, logs, and turning any
//!   bare error response into a problem document; it also sets each request's
//!   [`scope`] (the signing keys, the client's address).
//!
//! This crate knows no service and no table. Services depend on it, never the reverse.

pub mod auth;
pub mod body;
pub mod consistency;
pub mod error;
pub mod keys;
pub mod observe;
pub mod openapi;
pub mod page;
pub mod path;
pub mod ratelimit;
pub mod routes;
pub mod scope;
pub mod sessions;

pub use auth::{Caller, ServiceCaller, TokenKeys};
pub use body::{Fields, JsonObject};
pub use consistency::{CONSISTENCY_HEADER, ConsistencyToken, ReadConsistency};
pub use error::{ApiError, ErrorCode, FieldError, Problem};
pub use keys::{KeyMaterial, KeySource, Keys, RequestKeys, Signer};
pub use page::{Page, Paginated};
pub use path::Id;
pub use routes::{ServiceRouter, ServiceRoutes};
pub use scope::{Peer, RequestScope};
pub use sessions::{Session, SessionCheck};
