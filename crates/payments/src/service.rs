//! The payment service's use cases: charge an order once, record its outcome with
//! `payment.succeeded` / `payment.failed`, and show the gateway's ledger.

use std::sync::Arc;

use scaleshop_contracts::{PaymentFailed, PaymentSucceeded};
use scaleshop_db::{Consistency, Database, StoreError};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::domain::{
    ChargeOutcome, ChargeRequest, Currency, LedgerEntry, PaymentMethod, PaymentResult,
};
use crate::gateway::{GatewayError, PaymentGateway};
use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    /// Nothing was charged; try again later.
    #[error("{0}")]
    Transient(String),
    /// The charge may have been made; try again later with the same key, and do not
    /// undo what it paid for meanwhile.
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The payment service's in-process API.
#[derive(Clone)]
pub struct Payments {
    db: Database,
    gateway: Arc<dyn PaymentGateway>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Payments")
    }
}

impl Payments {
    pub fn new(db: Database, gateway: Arc<dyn PaymentGateway>) -> Self {
        Self { db, gateway }
    }

    pub fn accepts(&self, method: PaymentMethod) -> bool {
        self.gateway.accepts(method)
    }

    /// Charges an order, once: the gateway key is derived from the order, and the
    /// outcome is recorded (with its event) the first time only. A provider error is
    /// `Transient` (or `Unknown` when the answer was lost) unless `last_attempt`,
    /// when it becomes the final `Error`; a lost answer on the last attempt is asked
    /// for once more first (same key), so a charge that was made is not recorded as
    /// failed when the provider can still say so.
    pub async fn charge(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &Currency,
        method: PaymentMethod,
        last_attempt: bool,
    ) -> Result<PaymentResult, PaymentsError> {
        if let Some(result) = store::result_of(&self.db, order_id).await? {
            return Ok(result);
        }
        if !self.gateway.accepts(method) {
            return Err(PaymentsError::Invalid(format!(
                "the gateway does not take {method}"
            )));
        }
        let request = ChargeRequest {
            idempotency_key: format!("order-{order_id}"),
            order_id,
            amount_cents,
            currency: currency.clone(),
            method,
        };
        let mut answer = self.gateway.charge(&request).await;
        if last_attempt && matches!(answer, Err(GatewayError::Unknown(_))) {
            answer = self.gateway.charge(&request).await;
        }
        let result = match answer {
            Ok(ChargeOutcome::Succeeded) => PaymentResult::Succeeded,
            Ok(ChargeOutcome::Declined) => PaymentResult::Declined,
            Err(GatewayError::Transient(e)) if !last_attempt => {
                return Err(PaymentsError::Transient(e));
            }
            Err(GatewayError::Unknown(e)) if !last_attempt => {
                return Err(PaymentsError::Unknown(e));
            }
            Err(GatewayError::Transient(_) | GatewayError::Unknown(_)) => PaymentResult::Error,
            Err(GatewayError::Invalid(e)) => return Err(PaymentsError::Invalid(e)),
            Err(GatewayError::Store(e)) => return Err(e.into()),
        };
        self.record(&request, result).await
    }

    async fn record(
        &self,
        request: &ChargeRequest,
        result: PaymentResult,
    ) -> Result<PaymentResult, PaymentsError> {
        let mut tx = self.db.begin().await?;
        if !store::insert_result(&mut tx, request.order_id, result).await? {
            tx.rollback().await?;
            return Ok(store::result_of(&self.db, request.order_id)
                .await?
                .unwrap_or(result));
        }
        let failed = |reason: &str| {
            NewEvent::typed(
                request.order_id,
                &PaymentFailed {
                    order_id: request.order_id,
                    amount_cents: request.amount_cents,
                    currency: request.currency.to_string(),
                    idempotency_key: request.idempotency_key.clone(),
                    reason: reason.to_owned(),
                },
            )
        };
        let event = match result {
            PaymentResult::Succeeded => NewEvent::typed(
                request.order_id,
                &PaymentSucceeded {
                    order_id: request.order_id,
                    amount_cents: request.amount_cents,
                    currency: request.currency.to_string(),
                    idempotency_key: request.idempotency_key.clone(),
                    reason: None,
                },
            ),
            PaymentResult::Declined => failed("payment_declined"),
            PaymentResult::Error => failed("payment_error"),
        }?;
        scaleshop_events::append(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(result)
    }

    /// The gateway's ledger entries for an order, oldest first (may be served by
    /// a read replica within `consistency`).
    pub async fn ledger(
        &self,
        order_id: Uuid,
        consistency: Consistency,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        store::ledger(&self.db, order_id, consistency).await
    }
}
