//! The inventory service: per product `available`, `reserved` and `sold`.
//!
//! Every change is a conditional `UPDATE` that cannot take a column below zero
//! (`available >= q`), so however many orders race for the last unit, `sold +
//! reserved` never exceeds what was put in. Reservations are kept per order, which
//! makes reserve, release and sell idempotent: a redelivered event or a retried
//! saga step changes nothing twice.
//!
//! Stock rows are created from `product.created` events (the catalog's), and the
//! service reacts to `order.processed` (sell), `order.failed` and `order.cancelled`
//! (release). It never reads another service's tables.

pub mod http;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use scaleshop_contracts::{
    InventoryAdjusted, InventoryReleased, InventoryReserved, InventorySold, OrderCancelled,
    OrderFailed, OrderProcessed, ProductCreated, StockLine,
};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow, types::Json};
use scaleshop_db::{Database, Migrations, StoreError, Tx, with_pool, with_tx};
use scaleshop_events::{Consumer, Event, EventSet, HandlerError, NewEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The name of this service's event consumer.
pub const CONSUMER: &str = "inventory";

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "inventory",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// Stock of one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, FromRow, utoipa::ToSchema)]
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

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("no stock record for product {0}")]
    UnknownProduct(Uuid),
    #[error("the adjustment would make available negative")]
    WouldGoNegative,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for InventoryError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

/// The inventory service's in-process API.
#[derive(Debug, Clone)]
pub struct Inventory {
    db: Database,
}

const STOCK: &str = "SELECT product_id, available, reserved, sold FROM stock WHERE product_id = $1";

/// Merges lines of the same product and sorts them by product id, so concurrent
/// reservations lock rows in one order (no deadlocks).
fn normalize(lines: &[Line]) -> Vec<Line> {
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

impl Inventory {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn get(&self, product_id: Uuid) -> Result<Option<Stock>, StoreError> {
        Ok(
            with_pool!(self.db, pool => sqlx::query_as(STOCK).bind(product_id).fetch_optional(pool).await?),
        )
    }

    /// Like [`get`](Self::get), but a product whose `product.created` this service
    /// has not handled yet is waited for (bounded), so a read right after a write
    /// sees it.
    pub async fn get_fresh(&self, product_id: Uuid) -> Result<Option<Stock>, StoreError> {
        if let Some(stock) = self.get(product_id).await? {
            return Ok(Some(stock));
        }
        if scaleshop_events::dispatch::wait_caught_up(&self.db, CONSUMER, Duration::from_secs(2))
            .await?
        {
            return self.get(product_id).await;
        }
        Ok(None)
    }

    /// Stock of several products (those with a record).
    pub async fn levels(&self, product_ids: &[Uuid]) -> Result<HashMap<Uuid, Stock>, StoreError> {
        let mut levels = HashMap::with_capacity(product_ids.len());
        for id in product_ids {
            if let Some(stock) = self.get(*id).await? {
                levels.insert(*id, stock);
            }
        }
        Ok(levels)
    }

    /// Adds `delta` (negative to remove) to `available`; refused when the result
    /// would be negative. Publishes `inventory.adjusted`.
    pub async fn adjust(
        &self,
        product_id: Uuid,
        delta: i64,
        reason: &str,
    ) -> Result<Stock, InventoryError> {
        const UPDATE: &str = "UPDATE stock SET available = available + $2, updated_at = $3 \
                              WHERE product_id = $1 AND available + $2 >= 0";
        const LOG: &str = "INSERT INTO stock_adjustments (id, product_id, delta, reason, created_at) \
                           VALUES ($1, $2, $3, $4, $5)";
        if self.get_fresh(product_id).await?.is_none() {
            return Err(InventoryError::UnknownProduct(product_id));
        }
        let mut tx = self.db.begin().await?;
        let at = now();
        let stock: Option<Stock> = with_tx!(&mut tx, conn => {
            let done = sqlx::query(UPDATE).bind(product_id).bind(delta).bind(at).execute(&mut *conn).await?;
            if done.rows_affected() == 1 {
                sqlx::query(LOG).bind(Uuid::now_v7()).bind(product_id).bind(delta).bind(reason).bind(at)
                    .execute(&mut *conn).await?;
                sqlx::query_as(STOCK).bind(product_id).fetch_optional(conn).await?
            } else {
                None
            }
        });
        let Some(stock) = stock else {
            tx.rollback().await?;
            return Err(InventoryError::WouldGoNegative);
        };
        let event = NewEvent::typed(
            product_id,
            &InventoryAdjusted {
                product_id,
                delta,
                reason: reason.to_owned(),
                available: stock.available,
            },
        )?;
        scaleshop_events::append(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(stock)
    }

    /// Reserves every line for `order_id`, all or nothing. Idempotent per order: a
    /// second call returns the first decision. `UnknownProduct` when a product has
    /// no stock record yet (its `product.created` is still on its way): try later.
    pub async fn reserve(
        &self,
        order_id: Uuid,
        lines: &[Line],
    ) -> Result<Reservation, InventoryError> {
        const CLAIM: &str = "INSERT INTO reservations (order_id, state, items, created_at, updated_at) \
                             VALUES ($1, 'reserved', $2, $3, $3) ON CONFLICT (order_id) DO NOTHING";
        const TAKE: &str = "UPDATE stock SET available = available - $2, reserved = reserved + $2, updated_at = $3 \
                            WHERE product_id = $1 AND available >= $2";
        const EXISTS: &str = "SELECT COUNT(*) FROM stock WHERE product_id = $1";
        let lines = normalize(lines);
        let at = now();
        let mut tx = self.db.begin().await?;
        let claimed = with_tx!(&mut tx, conn => {
            sqlx::query(CLAIM).bind(order_id).bind(Json(&lines)).bind(at).execute(conn).await?.rows_affected()
        });
        if claimed == 0 {
            tx.rollback().await?;
            return self.decided(order_id).await;
        }
        for line in &lines {
            let (taken, exists): (u64, i64) = with_tx!(&mut tx, conn => {
                let taken = sqlx::query(TAKE).bind(line.product_id).bind(line.quantity).bind(at)
                    .execute(&mut *conn).await?.rows_affected();
                if taken == 0 {
                    let exists: i64 = sqlx::query_scalar(EXISTS).bind(line.product_id).fetch_one(&mut *conn).await?;
                    // Each statement reads its own snapshot (PostgreSQL, read
                    // committed): a stock record committed after the first take
                    // began is seen here. Take again, so that only a record that
                    // existed before the take counts as short.
                    let taken = if exists == 0 {
                        0
                    } else {
                        sqlx::query(TAKE).bind(line.product_id).bind(line.quantity).bind(at)
                            .execute(conn).await?.rows_affected()
                    };
                    (taken, exists)
                } else {
                    (taken, 1)
                }
            });
            if taken == 0 {
                tx.rollback().await?;
                if exists == 0 {
                    return Err(InventoryError::UnknownProduct(line.product_id));
                }
                return self.reject(order_id, &lines, line.product_id).await;
            }
        }
        let event = NewEvent::typed(
            order_id,
            &InventoryReserved {
                order_id,
                items: stock_lines(&lines),
            },
        )?;
        scaleshop_events::append(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(Reservation::Reserved)
    }

    /// Releases the order's reservation, if it holds one (idempotent).
    pub async fn release(&self, order_id: Uuid) -> Result<bool, StoreError> {
        let mut tx = self.db.begin().await?;
        let released = settle(&mut tx, order_id, "released").await?;
        tx.commit().await?;
        Ok(released)
    }

    /// Records a refusal, so that a retry gives the same answer.
    async fn reject(
        &self,
        order_id: Uuid,
        lines: &[Line],
        short: Uuid,
    ) -> Result<Reservation, InventoryError> {
        const REJECT: &str = "INSERT INTO reservations (order_id, state, items, short_product_id, created_at, \
                              updated_at) VALUES ($1, 'rejected', $2, $3, $4, $4) ON CONFLICT (order_id) DO NOTHING";
        let mut tx = self.db.begin().await?;
        with_tx!(&mut tx, conn => {
            sqlx::query(REJECT).bind(order_id).bind(Json(lines)).bind(short).bind(now()).execute(conn).await?;
        });
        tx.commit().await?;
        self.decided(order_id).await
    }

    async fn decided(&self, order_id: Uuid) -> Result<Reservation, InventoryError> {
        const Q: &str = "SELECT state, short_product_id FROM reservations WHERE order_id = $1";
        let row: Option<(String, Option<Uuid>)> = with_pool!(self.db, pool => sqlx::query_as(Q).bind(order_id).fetch_optional(pool).await?);
        Ok(match row {
            Some((state, _)) if state == "reserved" || state == "sold" => Reservation::Reserved,
            Some((state, _)) if state == "released" => Reservation::Released,
            Some((_, Some(short))) => Reservation::OutOfStock { product_id: short },
            _ => {
                return Err(
                    StoreError::Other(format!("reservation of order {order_id} vanished")).into(),
                );
            }
        })
    }
}

/// Moves a reservation from `reserved` to `to` (`released` or `sold`), adjusting
/// stock, in the caller's transaction. Does nothing (false) when the order holds
/// no reservation in state `reserved`.
async fn settle(tx: &mut Tx, order_id: Uuid, to: &'static str) -> Result<bool, StoreError> {
    const MOVE: &str = "UPDATE reservations SET state = $2, updated_at = $3 WHERE order_id = $1 AND state = 'reserved'";
    const ITEMS: &str = "SELECT items FROM reservations WHERE order_id = $1";
    const RELEASE: &str = "UPDATE stock SET available = available + $2, reserved = reserved - $2, updated_at = $3 \
                           WHERE product_id = $1 AND reserved >= $2";
    const SELL: &str = "UPDATE stock SET sold = sold + $2, reserved = reserved - $2, updated_at = $3 \
                        WHERE product_id = $1 AND reserved >= $2";
    let at = now();
    let moved = with_tx!(&mut *tx, conn => {
        sqlx::query(MOVE).bind(order_id).bind(to).bind(at).execute(conn).await?.rows_affected()
    });
    if moved == 0 {
        return Ok(false);
    }
    let Json(lines): Json<Vec<Line>> = with_tx!(&mut *tx, conn => {
        sqlx::query_scalar(ITEMS).bind(order_id).fetch_one(conn).await?
    });
    let sql = if to == "sold" { SELL } else { RELEASE };
    for line in &lines {
        let done = with_tx!(&mut *tx, conn => {
            sqlx::query(sql).bind(line.product_id).bind(line.quantity).bind(at).execute(conn).await?.rows_affected()
        });
        if done != 1 {
            return Err(StoreError::Other(format!(
                "reserved stock of {} is short for order {order_id}",
                line.product_id
            )));
        }
    }
    let items = stock_lines(&lines);
    let event = if to == "sold" {
        NewEvent::typed(order_id, &InventorySold { order_id, items })?
    } else {
        NewEvent::typed(order_id, &InventoryReleased { order_id, items })?
    };
    scaleshop_events::append(tx, &event).await?;
    Ok(true)
}

/// The lines of a reservation as its events carry them.
fn stock_lines(lines: &[Line]) -> Vec<StockLine> {
    lines
        .iter()
        .map(|l| StockLine {
            product_id: l.product_id,
            quantity: l.quantity,
        })
        .collect()
}

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
                const Q: &str = "INSERT INTO stock (product_id, available, reserved, sold, updated_at) \
                                 VALUES ($1, $2, 0, 0, $3) ON CONFLICT (product_id) DO NOTHING";
                with_tx!(tx, conn => {
                    sqlx::query(Q).bind(created.product_id).bind(created.initial_stock).bind(now())
                        .execute(conn).await.map_err(StoreError::from)?;
                });
            }
            Reaction::OrderProcessed(order) => {
                settle(tx, order.order_id, "sold").await?;
            }
            Reaction::OrderFailed(OrderFailed { order_id, .. })
            | Reaction::OrderCancelled(OrderCancelled { order_id, .. }) => {
                settle(tx, order_id, "released").await?;
            }
        }
        Ok(())
    }
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
