//! The `order-processor` consumer: each `order.created` becomes one `orders` saga
//! job ([`crate::saga`]), enqueued in the delivery's transaction.

use async_trait::async_trait;
use scaleshop_contracts::OrderCreated;
use scaleshop_db::Tx;
use scaleshop_events::{Consumer, Contract, Event, HandlerError};
use scaleshop_jobs::NewJob;
use serde_json::json;

use crate::saga::SAGA_QUEUE;

/// Turns each `order.created` into a durable saga job (in the delivery's
/// transaction: exactly one job per order).
#[derive(Debug, Clone, Copy)]
pub struct OrderProcessor {
    pub max_attempts: u32,
}

#[async_trait]
impl Consumer for OrderProcessor {
    fn name(&self) -> &'static str {
        "order-processor"
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == OrderCreated::NAME
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        let order: OrderCreated = event.decode()?;
        let job = NewJob {
            max_attempts: Some(self.max_attempts),
            ..NewJob::new(SAGA_QUEUE, json!({"order_id": order.order_id}))
        };
        scaleshop_jobs::enqueue(tx, &job).await?;
        Ok(())
    }
}
