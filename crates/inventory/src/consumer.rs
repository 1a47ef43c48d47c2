//! The `inventory` consumer: `product.created` makes a stock record,
//! `order.processed` sells the order's reservation, `order.failed` and
//! `order.cancelled` release it; each in the delivery's transaction.

use async_trait::async_trait;
use scaleshop_contracts::{OrderCancelled, OrderFailed, OrderProcessed, ProductCreated};
use scaleshop_db::Tx;
use scaleshop_events::{Consumer, Event, EventSet, HandlerError};

use crate::domain::Settlement;
use crate::service::settle;
use crate::store;

/// The name of this service's event consumer.
pub const CONSUMER: &str = "inventory";

/// The inventory service's reactions to other services' events.
#[derive(Debug, Clone, Copy)]
pub struct InventoryConsumer;

scaleshop_contracts::event_set! {
    /// The events the inventory consumer reacts to.
    #[derive(Debug)]
    enum Reaction {
        ProductCreated(ProductCreated),
        OrderProcessed(OrderProcessed),
        OrderFailed(OrderFailed),
        OrderCancelled(OrderCancelled),
    }
}

#[async_trait]
impl Consumer for InventoryConsumer {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn wants(&self, event_type: &str) -> bool {
        Reaction::wants(event_type)
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        let Some(reaction) = Reaction::decode(event)? else {
            return Ok(());
        };
        match reaction {
            Reaction::ProductCreated(created) => {
                store::create_stock(tx, created.product_id, created.initial_stock).await?;
            }
            Reaction::OrderProcessed(order) => {
                settle(tx, order.order_id, Settlement::Sold).await?;
            }
            Reaction::OrderFailed(OrderFailed { order_id, .. })
            | Reaction::OrderCancelled(OrderCancelled { order_id, .. }) => {
                settle(tx, order_id, Settlement::Released).await?;
            }
        }
        Ok(())
    }
}
