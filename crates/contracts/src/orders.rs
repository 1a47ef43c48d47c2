//! Events of the orders service.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

/// A line of an order, priced when the order was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// `order.created`: an order was placed (`pending`); the order processor starts
/// its saga from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    pub currency: String,
}
contract!(OrderCreated, "order.created", 1);

/// `order.processed`: the order is paid (`completed`); its reservation is sold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderProcessed {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    pub currency: String,
}
contract!(OrderProcessed, "order.processed", 1);

/// `order.failed`: the order ended `failed`; its reservation, if any, is released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFailed {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub items: Vec<OrderItem>,
    pub total_cents: i64,
    pub currency: String,
    /// `out_of_stock`, `payment_declined` or `payment_error`.
    pub reason: String,
}
contract!(OrderFailed, "order.failed", 1);

/// `order.cancelled`: the customer cancelled a pending order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub user_id: Uuid,
}
contract!(OrderCancelled, "order.cancelled", 1);
