//! Events of the payments service.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

/// `payment.succeeded`: an order's charge went through (aggregate: the order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentSucceeded {
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    pub idempotency_key: String,
    /// Always `null` here (the field is shared with `payment.failed` on the wire).
    pub reason: Option<String>,
}
contract!(PaymentSucceeded, "payment.succeeded", 1);

/// `payment.failed`: an order's charge was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentFailed {
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    pub idempotency_key: String,
    /// `payment_declined` or `payment_error`.
    pub reason: String,
}
contract!(PaymentFailed, "payment.failed", 1);
