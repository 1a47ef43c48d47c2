//! What the order service asks of other services, as ports: the users service
//! (is this account there?), the catalog (what do these products cost?), the
//! inventory (reserve, release) and payments (which methods, charge). The
//! composition root plugs in an adapter per port: the other service's in-process
//! API when it runs in the same process, or its HTTP API when it runs elsewhere.
//! The order service itself never knows which.

use std::fmt::Debug;

use async_trait::async_trait;
use scaleshop_inventory::{InventoryError, Line, Reservation};
use scaleshop_payments::{PaymentResult, PaymentsError};

use crate::domain::{Currency, PaymentMethod};
use uuid::Uuid;

/// A call to another service that did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PortError {
    /// The service could not be reached, timed out or is failing (or its breaker
    /// is open): try again later.
    #[error("the {service} service is unavailable: {reason}")]
    Unavailable {
        service: &'static str,
        reason: String,
        /// When it is worth trying again, in seconds.
        retry_after_secs: u64,
    },
    /// Anything else (an answer that breaks the contract).
    #[error("the {service} service failed: {reason}")]
    Failed {
        service: &'static str,
        reason: String,
    },
}

/// A product as an order prices it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub id: Uuid,
    pub price_cents: i64,
    pub currency: Currency,
}

#[async_trait]
pub trait UsersPort: Send + Sync + Debug {
    /// Does the account exist?
    async fn user_exists(&self, user_id: Uuid) -> Result<bool, PortError>;
}

#[async_trait]
pub trait CatalogPort: Send + Sync + Debug {
    /// The products among `ids` that exist, with their prices now.
    async fn prices(&self, ids: &[Uuid]) -> Result<Vec<Priced>, PortError>;
}

#[async_trait]
pub trait InventoryPort: Send + Sync + Debug {
    /// Reserves every line or none; idempotent per order.
    async fn reserve(&self, order_id: Uuid, lines: &[Line]) -> Result<Reservation, InventoryError>;
    /// Releases the order's reservation, if any; idempotent.
    async fn release(&self, order_id: Uuid) -> Result<bool, InventoryError>;
}

#[async_trait]
pub trait PaymentsPort: Send + Sync + Debug {
    /// Is `method` a payment method the gateway takes?
    async fn accepts(&self, method: PaymentMethod) -> Result<bool, PortError>;
    /// Charges the order once (the key is derived from the order); see
    /// `scaleshop_payments::Payments::charge`.
    async fn charge(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &Currency,
        method: PaymentMethod,
        last_attempt: bool,
    ) -> Result<PaymentResult, PaymentsError>;
}
