//! The catalog service: products. Admins create and change them; anyone reads and
//! searches. Creating a product publishes `product.created` (with its initial
//! stock, from which the inventory service makes its stock record); a change
//! publishes `product.updated`. A product's `available` comes from the inventory
//! service's API, never its tables.
//!
//! Reads of many products go to the query side ([`query`]): the product listing
//! projection ([`listing`]) and the search projection of `scaleshop_search`,
//! both fed by events, or the command side while they cannot answer.
//!
//! Layers: [`domain`] (types that cannot hold a bad value) <- [`service`] (use
//! cases, the cache) <- [`http`] (routes). Only `store` names sqlx; only `http`
//! names axum.

pub mod domain;
pub mod http;
pub mod listing;
pub mod query;
pub mod service;
mod store;

pub use service::{Catalog, CatalogError, Listed, ProductDirectory, ProductImages, ProductView};
pub use store::migrations;
