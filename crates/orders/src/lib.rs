//! The order service and the order processor.
//!
//! Placing an order checks the items through the catalog's API (never its tables),
//! takes the prices of that moment, writes the order and `order.created` in one
//! transaction (with the `Idempotency-Key` record, when there is one). The processor
//! is a saga over the event log: the `order-processor` consumer turns
//! `order.created` into a durable `orders` job, which reserves stock (inventory
//! API, idempotent per order), charges the payment method (payments API; the
//! gateway de-duplicates by a key derived from the order), and ends the order
//! `completed` with `order.processed`, or `failed` with `order.failed` and the
//! reason — the inventory service then releases the reservation. Each step records
//! where the saga is (`step`), so a crash resumes it; each step is idempotent, so a
//! re-run changes nothing twice.
//!
//! Reads go to the read side: [`history`], the order-history projection built
//! from `order.*` events (the command side answers what it cannot yet).
//!
//! Layers: [`domain`] (parsed types: status, step, failure reason, currency,
//! payment method) <- [`service`] (use cases, over the [`ports`] of the other
//! services) <- [`http`] (routes); [`consumer`] turns `order.created` into a
//! [`saga`] job; [`idempotency`] keeps `Idempotency-Key` records. Only [`store`]
//! and `idempotency` name sqlx; only `http` names axum.

pub mod consumer;
pub mod domain;
pub mod history;
pub mod http;
pub mod idempotency;
pub mod ports;
pub mod saga;
pub mod service;
pub mod store;

pub use consumer::OrderProcessor;
pub use domain::PlaceOrder;
pub use ports::{CatalogPort, InventoryPort, PaymentsPort, PortError, Priced, UsersPort};
pub use saga::{OrderSaga, SAGA_QUEUE};
pub use service::{Orders, OrdersError};
pub use store::migrations;
