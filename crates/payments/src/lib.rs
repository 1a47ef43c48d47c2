//! Payments. The [`PaymentGateway`] port ([`gateway`]) and the built-in [`SandboxGateway`], which
//! takes test tokens in the manner of well-known providers and keeps a ledger of
//! every charge attempt that reached it (so a double charge would be visible). The
//! gateway de-duplicates by idempotency key: a second charge with the same key
//! returns the first final answer and charges nothing.
//!
//! [`Payments::charge`] records the outcome for the order once and publishes
//! `payment.succeeded` or `payment.failed` with it.
//!
//! A provider error comes in two kinds: the provider said it charged nothing
//! ([`GatewayError::Transient`]), or the answer never came ([`GatewayError::Unknown`],
//! a timeout): the charge may have been made, and only asking again with the same
//! idempotency key tells. The sandbox can be made to lose answers ([`faults`]).
//!
//! Layers: [`domain`] (currency, payment method, statuses: parsed, never bare
//! strings) <- [`service`] (use cases) <- [`http`] (routes); [`gateway`] is the
//! provider port and the sandbox; only [`store`] names sqlx and only `http` names
//! axum.

pub mod domain;
pub mod faults;
pub mod gateway;
pub mod http;
pub mod service;
pub mod store;

pub use domain::{
    ChargeOutcome, ChargeRequest, Currency, LedgerEntry, LedgerStatus, PaymentMethod, PaymentResult,
};
pub use gateway::{GatewayError, PaymentGateway, SandboxGateway};
pub use service::{Payments, PaymentsError};
pub use store::migrations;
