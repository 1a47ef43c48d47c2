//! Events of the inventory service.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

/// A quantity of one product, in a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    pub product_id: Uuid,
    pub quantity: i64,
}

/// `inventory.adjusted`: an admin moved a product's `available` stock by `delta`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryAdjusted {
    pub product_id: Uuid,
    pub delta: i64,
    pub reason: String,
    /// `available` after the adjustment.
    pub available: i64,
}
contract!(InventoryAdjusted, "inventory.adjusted", 1);

/// `inventory.reserved`: every line of an order is reserved (aggregate: the order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReserved {
    pub order_id: Uuid,
    pub items: Vec<StockLine>,
}
contract!(InventoryReserved, "inventory.reserved", 1);

/// `inventory.released`: an order's reservation went back to `available`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReleased {
    pub order_id: Uuid,
    pub items: Vec<StockLine>,
}
contract!(InventoryReleased, "inventory.released", 1);

/// `inventory.sold`: an order's reservation became `sold`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventorySold {
    pub order_id: Uuid,
    pub items: Vec<StockLine>,
}
contract!(InventorySold, "inventory.sold", 1);
