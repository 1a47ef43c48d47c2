//! Inventory domain types: stock levels, order lines as inventory sees them, and
//! the decision a reservation comes to. No I/O.

use std::collections::BTreeMap;

use scaleshop_contracts::StockLine;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Stock of one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Stock {
    pub product_id: Uuid,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

/// One line of an order, as inventory sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub product_id: Uuid,
    pub quantity: i64,
}

/// The outcome of a reservation, stable for an order once decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    /// Not enough of this product.
    OutOfStock {
        product_id: Uuid,
    },
    /// Reserved earlier and since released (the order was cancelled or failed).
    Released,
}

/// Where a held reservation goes when its order ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The order was paid: reserved units become sold.
    Sold,
    /// The order failed or was cancelled: reserved units become available again.
    Released,
}

impl Settlement {
    /// The reservation's state afterwards, as the table stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sold => "sold",
            Self::Released => "released",
        }
    }
}

/// Merges lines of the same product and sorts them by product id, so concurrent
/// reservations lock rows in one order (no deadlocks).
pub fn normalize(lines: &[Line]) -> Vec<Line> {
    let mut merged: BTreeMap<Uuid, i64> = BTreeMap::new();
    for line in lines {
        *merged.entry(line.product_id).or_default() += line.quantity;
    }
    merged
        .into_iter()
        .map(|(product_id, quantity)| Line {
            product_id,
            quantity,
        })
        .collect()
}

/// The lines of a reservation as its events carry them.
pub fn stock_lines(lines: &[Line]) -> Vec<StockLine> {
    lines
        .iter()
        .map(|l| StockLine {
            product_id: l.product_id,
            quantity: l.quantity,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_merges_and_sorts() {
        let a = Uuid::from_u128(2);
        let b = Uuid::from_u128(1);
        let lines = normalize(&[
            Line {
                product_id: a,
                quantity: 1,
            },
            Line {
                product_id: b,
                quantity: 2,
            },
            Line {
                product_id: a,
                quantity: 3,
            },
        ]);
        assert_eq!(
            lines,
            vec![
                Line {
                    product_id: b,
                    quantity: 2
                },
                Line {
                    product_id: a,
                    quantity: 4
                }
            ]
        );
    }
}
