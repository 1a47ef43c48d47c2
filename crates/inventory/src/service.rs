//! The inventory's use cases: read stock, adjust it, reserve an order's lines (all
//! or none, idempotent per order), release or sell a reservation; each change with
//! its event in the same transaction.

use std::collections::HashMap;
use std::time::Duration;

use scaleshop_contracts::{InventoryAdjusted, InventoryReleased, InventoryReserved, InventorySold};
use scaleshop_db::{Database, StoreError, Tx};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::consumer::CONSUMER;
use crate::domain::{Line, Reservation, Settlement, Stock, normalize, stock_lines};
use crate::store::{self, Take};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("no stock record for product {0}")]
    UnknownProduct(Uuid),
    #[error("the adjustment would make available negative")]
    WouldGoNegative,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The inventory service's in-process API.
#[derive(Debug, Clone)]
pub struct Inventory {
    db: Database,
}

/// Ids per batched read (a page of products is at most 100).
const BATCH: usize = 200;

impl Inventory {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn get(&self, product_id: Uuid) -> Result<Option<Stock>, StoreError> {
        store::get(&self.db, product_id).await
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

    /// Stock of several products (those with a record), in one read.
    pub async fn levels(&self, product_ids: &[Uuid]) -> Result<HashMap<Uuid, Stock>, StoreError> {
        let mut levels = HashMap::with_capacity(product_ids.len());
        for chunk in product_ids.chunks(BATCH) {
            for stock in store::get_many(&self.db, chunk).await? {
                levels.insert(stock.product_id, stock);
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
        if self.get_fresh(product_id).await?.is_none() {
            return Err(InventoryError::UnknownProduct(product_id));
        }
        let mut tx = self.db.begin().await?;
        let Some(stock) = store::adjust(&mut tx, product_id, delta, reason).await? else {
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
        let lines = normalize(lines);
        let mut tx = self.db.begin().await?;
        if !store::claim(&mut tx, order_id, &lines).await? {
            tx.rollback().await?;
            return self.decided(order_id).await;
        }
        for line in &lines {
            match store::take(&mut tx, line).await? {
                Take::Taken => {}
                Take::NoRecord => {
                    tx.rollback().await?;
                    return Err(InventoryError::UnknownProduct(line.product_id));
                }
                Take::Short => {
                    tx.rollback().await?;
                    // Recorded, so that a retry gives the same answer.
                    store::reject(&self.db, order_id, &lines, line.product_id).await?;
                    return self.decided(order_id).await;
                }
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
        let released = settle(&mut tx, order_id, Settlement::Released).await?;
        tx.commit().await?;
        Ok(released)
    }

    async fn decided(&self, order_id: Uuid) -> Result<Reservation, InventoryError> {
        store::decided(&self.db, order_id).await?.ok_or_else(|| {
            StoreError::Other(format!("reservation of order {order_id} vanished")).into()
        })
    }
}

/// Moves a reservation from `reserved` to sold or released, adjusting stock, with
/// `inventory.sold` or `inventory.released`, in the caller's transaction. Does
/// nothing (false) when the order holds no reservation in state `reserved`.
pub(crate) async fn settle(
    tx: &mut Tx,
    order_id: Uuid,
    to: Settlement,
) -> Result<bool, StoreError> {
    let Some(lines) = store::settle(tx, order_id, to).await? else {
        return Ok(false);
    };
    let items = stock_lines(&lines);
    let event = match to {
        Settlement::Sold => NewEvent::typed(order_id, &InventorySold { order_id, items })?,
        Settlement::Released => NewEvent::typed(order_id, &InventoryReleased { order_id, items })?,
    };
    scaleshop_events::append(tx, &event).await?;
    Ok(true)
}
