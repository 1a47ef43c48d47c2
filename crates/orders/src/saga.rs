//! The order saga: the `orders` job, one run per order (reserve, charge, end),
//! resumable from the order's `step`. The `order-processor` consumer
//! ([`crate::consumer`]) enqueues it.

use async_trait::async_trait;
use scaleshop_contracts::{OrderFailed, OrderProcessed};
use scaleshop_db::{StoreError, Tx};
use scaleshop_events::NewEvent;
use std::sync::Arc;

use scaleshop_inventory::{InventoryError, Line, Reservation};
use scaleshop_jobs::{Job, JobError, JobHandler};
use scaleshop_payments::{PaymentResult, PaymentsError};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::{FailureReason, Order, Status, Step};
use crate::ports::{InventoryPort, PaymentsPort};
use crate::service::event_items;
use crate::store::{Ending, OrderStore};

/// The queue of saga runs.
pub const SAGA_QUEUE: &str = "orders";

#[derive(Debug, Deserialize)]
struct OrderRef {
    order_id: Uuid,
}

/// One run of the saga of one order: reserve, charge, end. Resumes from the
/// order's `step`; every step is idempotent.
#[derive(Debug, Clone)]
pub struct OrderSaga {
    store: OrderStore,
    inventory: Arc<dyn InventoryPort>,
    payments: Arc<dyn PaymentsPort>,
}

fn retry(error: impl std::fmt::Display) -> JobError {
    JobError::retry(error.to_string())
}

impl OrderSaga {
    pub fn new(
        db: scaleshop_db::Database,
        inventory: Arc<dyn InventoryPort>,
        payments: Arc<dyn PaymentsPort>,
    ) -> Self {
        Self {
            store: OrderStore::new(db),
            inventory,
            payments,
        }
    }

    /// Ends the order and appends `order.processed` or `order.failed`.
    async fn end(&self, order: &Order, reason: Option<FailureReason>) -> Result<(), JobError> {
        let mut tx = self.store.db().begin().await?;
        let ended = self.end_in(&mut tx, order, reason).await?;
        tx.commit().await?;
        if ended {
            count_outcome(reason);
        }
        Ok(())
    }

    async fn end_in(
        &self,
        tx: &mut Tx,
        order: &Order,
        reason: Option<FailureReason>,
    ) -> Result<bool, StoreError> {
        let (order_id, user_id) = (order.id, order.user_id);
        let (items, total_cents, currency) = (
            event_items(order),
            order.total_cents,
            order.currency.to_string(),
        );
        let at = scaleshop_db::clock::now().max(order.updated_at);
        let (status, event) = match reason {
            None => (
                Status::Completed,
                NewEvent::typed(
                    order_id,
                    &OrderProcessed {
                        order_id,
                        user_id,
                        items,
                        total_cents,
                        currency,
                        at: Some(at),
                    },
                )?,
            ),
            Some(reason) => (
                Status::Failed,
                NewEvent::typed(
                    order_id,
                    &OrderFailed {
                        order_id,
                        user_id,
                        items,
                        total_cents,
                        currency,
                        reason: reason.as_str().to_owned(),
                        at: Some(at),
                    },
                )?,
            ),
        };
        self.store
            .finish(
                tx,
                order,
                &[Step::Placed, Step::Reserved, Step::Charging],
                Ending { status, reason, at },
                &event,
            )
            .await
    }

    /// The order left `pending` under us (cancelled): make sure nothing stays reserved.
    async fn settle_cancelled(&self, id: Uuid) -> Result<(), JobError> {
        let order = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| JobError::permanent("the order vanished"))?;
        if order.status == Status::Cancelled {
            match self.inventory.release(id).await {
                Ok(_) => {}
                Err(InventoryError::Store(e)) => return Err(e.into()),
                Err(e) => return Err(retry(e)),
            }
        }
        Ok(())
    }

    async fn advance(&self, id: Uuid, from: Step, to: Step) -> Result<bool, JobError> {
        let mut tx = self.store.db().begin().await?;
        let moved = self.store.advance(&mut tx, id, &[from], to).await?;
        tx.commit().await?;
        Ok(moved)
    }
}

#[async_trait]
impl JobHandler for OrderSaga {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        let OrderRef { order_id } = serde_json::from_value(job.payload.0.clone())
            .map_err(|e| JobError::permanent(format!("bad saga payload: {e}")))?;
        let order = self
            .store
            .get(order_id)
            .await?
            .ok_or_else(|| JobError::permanent("no such order"))?;
        if order.status != Status::Pending {
            return self.settle_cancelled(order_id).await;
        }
        let mut step = order.step;
        if step == Step::Placed {
            let lines: Vec<Line> = order
                .items
                .iter()
                .map(|l| Line {
                    product_id: l.product_id,
                    quantity: l.quantity,
                })
                .collect();
            match self.inventory.reserve(order_id, &lines).await {
                Ok(Reservation::Reserved) => {
                    if !self.advance(order_id, Step::Placed, Step::Reserved).await? {
                        return self.settle_cancelled(order_id).await;
                    }
                    step = Step::Reserved;
                }
                Ok(Reservation::OutOfStock { .. }) => {
                    return self.end(&order, Some(FailureReason::OutOfStock)).await;
                }
                Ok(Reservation::Released) => return Ok(()),
                // The inventory has not seen the product yet: try again shortly.
                Err(InventoryError::UnknownProduct(product)) => {
                    return Err(JobError::retry(format!(
                        "no stock record for {product} yet"
                    )));
                }
                // A database that cannot be reached is not an attempt (see the jobs crate).
                Err(InventoryError::Store(e)) => return Err(e.into()),
                Err(e) => return Err(retry(e)),
            }
        }
        if step == Step::Reserved {
            if !self
                .advance(order_id, Step::Reserved, Step::Charging)
                .await?
            {
                return self.settle_cancelled(order_id).await;
            }
            step = Step::Charging;
        }
        if step != Step::Charging {
            return Ok(());
        }
        let last_attempt = job.attempts >= job.max_attempts;
        let result = self
            .payments
            .charge(
                order_id,
                order.total_cents,
                &order.currency,
                order.payment_method,
                last_attempt,
            )
            .await;
        match result {
            Ok(PaymentResult::Succeeded) => self.end(&order, None).await,
            Ok(PaymentResult::Declined) => {
                self.end(&order, Some(FailureReason::PaymentDeclined)).await
            }
            Ok(PaymentResult::Error) | Err(PaymentsError::Invalid(_)) => {
                self.end(&order, Some(FailureReason::PaymentError)).await
            }
            Err(PaymentsError::Transient(e)) => {
                // Nothing was charged: until the next attempt the order is just
                // reserved again, so it can still be cancelled while it waits.
                self.advance(order_id, Step::Charging, Step::Reserved)
                    .await?;
                Err(JobError::retry(format!("payment provider: {e}")))
            }
            // The charge may have been made: the order stays `charging` (no cancel)
            // until a later attempt learns the outcome under the same key.
            Err(PaymentsError::Unknown(e)) => {
                Err(JobError::retry(format!("payment provider: {e}")))
            }
            Err(PaymentsError::Store(e)) => Err(e.into()),
        }
    }

    /// The saga could not finish (its attempts ran out): the order fails, and the
    /// inventory releases what it reserved.
    async fn on_dead(&self, job: &Job, tx: &mut Tx) -> Result<(), StoreError> {
        let Ok(OrderRef { order_id }) = serde_json::from_value(job.payload.0.clone()) else {
            return Ok(());
        };
        if let Some(order) = self.store.get(order_id).await? {
            // Counted with the dead job's transition, which the worker commits.
            if self
                .end_in(tx, &order, Some(FailureReason::PaymentError))
                .await?
            {
                count_outcome(Some(FailureReason::PaymentError));
            }
        }
        Ok(())
    }
}

/// `order_outcomes_total{outcome, reason}`: one more order the saga ended.
fn count_outcome(reason: Option<FailureReason>) {
    let (outcome, reason) = match reason {
        None => ("completed", "none"),
        Some(reason) => ("failed", reason.as_str()),
    };
    metrics::counter!(
        scaleshop_telemetry::names::ORDER_OUTCOMES,
        "outcome" => outcome,
        "reason" => reason
    )
    .increment(1);
}
