//! The inventory service: per product `available`, `reserved` and `sold`.
//!
//! Every change is a conditional `UPDATE` that cannot take a column below zero
//! (`available >= q`), so however many orders race for the last unit, `sold +
//! reserved` never exceeds what was put in. Reservations are kept per order, which
//! makes reserve, release and sell idempotent: a redelivered event or a retried
//! saga step changes nothing twice.
//!
//! Stock rows are created from `product.created` events (the catalog's), and the
//! service reacts to `order.processed` (sell), `order.failed` and `order.cancelled`
//! (release). It never reads another service's tables.
//!
//! Layers: [`domain`] (stock, lines, reservation decisions; no I/O) <- [`service`]
//! (use cases, with their events) <- [`http`] (routes); [`consumer`] reacts to
//! events; only [`store`] names sqlx and only `http` names axum.

pub mod consumer;
pub mod domain;
pub mod http;
pub mod service;
pub mod store;

pub use consumer::{CONSUMER, InventoryConsumer};
pub use domain::{Line, Reservation, Stock};
pub use service::{Inventory, InventoryError};
pub use store::migrations;
