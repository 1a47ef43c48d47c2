//! Events of the orders service.

use chrono::{DateTime, Utc};
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
    /// When the order entered this state (its `created_at`, or the `updated_at`
    /// of the change). Added later (optional, same version): absent in older
    /// events, whose readers take the event's `occurred_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
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
    /// When the order entered this state (its `created_at`, or the `updated_at`
    /// of the change). Added later (optional, same version): absent in older
    /// events, whose readers take the event's `occurred_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
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
    /// When the order entered this state (its `created_at`, or the `updated_at`
    /// of the change). Added later (optional, same version): absent in older
    /// events, whose readers take the event's `occurred_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}
contract!(OrderFailed, "order.failed", 1);

/// `order.cancelled`: the customer cancelled a pending order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub user_id: Uuid,
    /// When the order entered this state (its `created_at`, or the `updated_at`
    /// of the change). Added later (optional, same version): absent in older
    /// events, whose readers take the event's `occurred_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}
contract!(OrderCancelled, "order.cancelled", 1);
