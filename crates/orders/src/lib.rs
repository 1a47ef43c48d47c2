//! The order service and the order processor.
//!
//! Placing an order checks the items through the catalog's API (never its tables),
//! takes the prices of that moment, writes the order and `order.created` in one
//! transaction (with the `Idempotency-Key` record, when there is one). The processor
//! is a saga over the event log: the `order-processor` consumer turns
//! `order.created` into a durable `orders` job, which reserves stock (inventory
//! API, idempotent per order), charges the payment method (payments API; the
//! gateway de-duplicates by a key derived from the order), and ends the order
//! `completed` with `order.processed`, or `failed` with `order.failed` and the
//! reason — the inventory service then releases the reservation. Each step records
//! where the saga is (`step`), so a crash resumes it; each step is idempotent, so a
//! re-run changes nothing twice.

pub mod domain;
pub mod http;
pub mod idempotency;
mod saga;
pub mod store;

use chrono::{SubsecRound, Utc};
use scaleshop_catalog::Catalog;
use scaleshop_db::{Consistency, Database, Migrations, StoreError};
use scaleshop_events::NewEvent;
use scaleshop_payments::Payments;
use serde_json::json;
use uuid::Uuid;

pub use saga::{OrderProcessor, OrderSaga, SAGA_QUEUE};

use crate::domain::{Order, OrderLine, Status, Step, WantedLine};
use crate::idempotency::{Idempotency, KeyRef, Stored};
use crate::store::OrderStore;

pub mod events {
    pub const CREATED: &str = "order.created";
    pub const PROCESSED: &str = "order.processed";
    pub const FAILED: &str = "order.failed";
    pub const CANCELLED: &str = "order.cancelled";
}

pub fn migrations() -> Migrations {
    store::migrations()
}

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("no such order")]
    NotFound,
    /// (index of the line, product id) of each product that does not exist.
    #[error("unknown products")]
    UnknownProducts(Vec<(usize, Uuid)>),
    #[error("the products are priced in more than one currency")]
    MixedCurrencies,
    #[error("unknown payment method")]
    UnknownPaymentMethod,
    #[error("the order can no longer be cancelled")]
    NotCancellable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An order as asked for.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub user_id: Uuid,
    pub lines: Vec<WantedLine>,
    pub payment_method: String,
}

/// The order service's in-process API.
#[derive(Debug, Clone)]
pub struct Orders {
    store: OrderStore,
    catalog: Catalog,
    payments: Payments,
    pub idempotency: Idempotency,
}

pub(crate) fn event_data(order: &Order) -> serde_json::Value {
    json!({
        "order_id": order.id,
        "user_id": order.user_id,
        "items": order.items,
        "total_cents": order.total_cents,
        "currency": order.currency,
    })
}

impl Orders {
    pub fn new(db: Database, catalog: Catalog, payments: Payments) -> Self {
        Self {
            store: OrderStore::new(db.clone()),
            catalog,
            payments,
            idempotency: Idempotency::new(db),
        }
    }

    /// Checks and prices an order; nothing is written.
    pub async fn price(&self, request: &PlaceOrder) -> Result<Order, OrdersError> {
        if !self.payments.accepts(&request.payment_method) {
            return Err(OrdersError::UnknownPaymentMethod);
        }
        let ids: Vec<Uuid> = request.lines.iter().map(|l| l.product_id).collect();
        let products = self.catalog.products(&ids).await.map_err(|e| match e {
            scaleshop_catalog::CatalogError::Store(e) => OrdersError::Store(e),
            other => OrdersError::Store(StoreError::Other(other.to_string())),
        })?;
        let mut unknown = Vec::new();
        let mut items = Vec::with_capacity(request.lines.len());
        let mut currency: Option<String> = None;
        let mut total: i64 = 0;
        for (index, line) in request.lines.iter().enumerate() {
            let Some(product) = products.iter().find(|p| p.id == line.product_id) else {
                unknown.push((index, line.product_id));
                continue;
            };
            match &currency {
                None => currency = Some(product.currency.as_str().to_owned()),
                Some(c) if c != product.currency.as_str() => {
                    return Err(OrdersError::MixedCurrencies);
                }
                Some(_) => {}
            }
            let unit = product.price_cents.get();
            // At most 50 lines x 1000 units x 10^8: far inside i64.
            total += unit * line.quantity.get();
            items.push(OrderLine {
                product_id: line.product_id,
                quantity: line.quantity.get(),
                unit_price_cents: unit,
            });
        }
        if !unknown.is_empty() {
            return Err(OrdersError::UnknownProducts(unknown));
        }
        let now = Utc::now().trunc_subsecs(6);
        Ok(Order {
            id: Uuid::now_v7(),
            user_id: request.user_id,
            status: Status::Pending,
            step: Step::Placed,
            items,
            total_cents: total,
            currency: currency.unwrap_or_default(),
            payment_method: request.payment_method.clone(),
            failure_reason: None,
            created_at: now,
            updated_at: now,
        })
    }

    /// Writes a priced order and `order.created`, and the idempotency record with
    /// the response `respond` makes of it, in one transaction.
    pub async fn place(
        &self,
        order: &Order,
        key: Option<&KeyRef>,
        respond: impl FnOnce(&Order) -> Stored,
    ) -> Result<Stored, OrdersError> {
        let stored = respond(order);
        let mut tx = self.store.db().begin().await?;
        OrderStore::insert(&mut tx, order).await?;
        if let Some(key) = key {
            Idempotency::complete_in(&mut tx, key, &stored).await?;
        }
        scaleshop_events::append(
            &mut tx,
            &NewEvent::new(events::CREATED, order.id, event_data(order)),
        )
        .await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub async fn get(&self, id: Uuid) -> Result<Order, OrdersError> {
        self.store.get(id).await?.ok_or(OrdersError::NotFound)
    }

    /// An order for a reader (may be served by a read replica within `consistency`).
    pub async fn read(&self, id: Uuid, consistency: Consistency) -> Result<Order, OrdersError> {
        self.store
            .read(id, consistency)
            .await?
            .ok_or(OrdersError::NotFound)
    }

    /// May be served by a read replica within `consistency`.
    pub async fn list(
        &self,
        user_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<Order>, OrdersError> {
        Ok(self.store.list(user_id, before, limit, consistency).await?)
    }

    /// Cancels a pending order that is not being charged; publishes `order.cancelled`
    /// (the inventory service releases any reservation).
    pub async fn cancel(&self, id: Uuid) -> Result<Order, OrdersError> {
        let order = self.get(id).await?;
        let event = NewEvent::new(
            events::CANCELLED,
            order.id,
            json!({"order_id": order.id, "user_id": order.user_id}),
        );
        let mut tx = self.store.db().begin().await?;
        let cancelled = self
            .store
            .finish(
                &mut tx,
                &order,
                &[Step::Placed, Step::Reserved],
                Status::Cancelled,
                None,
                &event,
            )
            .await?;
        if !cancelled {
            tx.rollback().await?;
            return Err(OrdersError::NotCancellable);
        }
        tx.commit().await?;
        self.get(id).await
    }
}
