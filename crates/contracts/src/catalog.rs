//! Events of the catalog service.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

/// `product.created`: a product exists, with the stock it starts with (from which
/// the inventory service makes its stock record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductCreated {
    pub product_id: Uuid,
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
    pub initial_stock: i64,
    /// Added later (an optional field, same version): absent in older events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When the product was made (created) or changed (updated), as its row says.
    /// Added later (optional, same version): absent in older events, whose
    /// readers take the event's `occurred_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}
contract!(ProductCreated, "product.created", 1);

/// `product.updated`: a product changed; the product as it is now, and the fields
/// that changed (`name`, `description`, `price_cents`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductUpdated {
    pub product_id: Uuid,
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
    pub initial_stock: i64,
    pub changed: Vec<String>,
    /// Added later (an optional field, same version): absent in older events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When the product was made (created) or changed (updated), as its row says.
    /// Added later (optional, same version): absent in older events, whose
    /// readers take the event's `occurred_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}
contract!(ProductUpdated, "product.updated", 1);
