//! The order service's use cases: price an order through the catalog's port, place
//! it (with `order.created` and the idempotency record, in one transaction), read,
//! list and cancel orders.

use std::sync::Arc;

use chrono::{SubsecRound, Utc};
use scaleshop_contracts::{OrderCancelled, OrderCreated, OrderItem};
use scaleshop_db::{Consistency, Database, StoreError};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::domain::{Currency, Order, OrderLine, PlaceOrder, Status, Step};
use crate::history::{OrderHistory, OrderRecord};
use crate::idempotency::{Idempotency, KeyRef, Stored};
use crate::ports::{CatalogPort, PaymentsPort, PortError, UsersPort};
use crate::store::{Ending, OrderStore};

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
    /// The caller's account is gone.
    #[error("no such user")]
    UnknownUser,
    /// A service the order needs did not answer.
    #[error("{service} unavailable")]
    Unavailable {
        service: &'static str,
        retry_after_secs: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PortError> for OrdersError {
    fn from(error: PortError) -> Self {
        match error {
            PortError::Unavailable {
                service,
                retry_after_secs,
                ..
            } => Self::Unavailable {
                service,
                retry_after_secs,
            },
            failed @ PortError::Failed { .. } => Self::Store(StoreError::Other(failed.to_string())),
        }
    }
}

/// The order service's in-process API.
#[derive(Debug, Clone)]
pub struct Orders {
    store: OrderStore,
    users: Arc<dyn UsersPort>,
    catalog: Arc<dyn CatalogPort>,
    payments: Arc<dyn PaymentsPort>,
    pub idempotency: Idempotency,
    /// The read side (`crate::history`), when this process registers it.
    history: Option<OrderHistory>,
}

/// The lines of an order as its events carry them.
pub(crate) fn event_items(order: &Order) -> Vec<OrderItem> {
    order
        .items
        .iter()
        .map(|line| OrderItem {
            product_id: line.product_id,
            quantity: line.quantity,
            unit_price_cents: line.unit_price_cents,
        })
        .collect()
}

impl Orders {
    pub fn new(
        db: Database,
        users: Arc<dyn UsersPort>,
        catalog: Arc<dyn CatalogPort>,
        payments: Arc<dyn PaymentsPort>,
    ) -> Self {
        Self {
            store: OrderStore::new(db.clone()),
            users,
            catalog,
            payments,
            idempotency: Idempotency::new(db),
            history: None,
        }
    }

    /// Reads go to the order-history projection (the command side answers what
    /// it cannot).
    pub fn with_history(mut self, history: OrderHistory) -> Self {
        self.history = Some(history);
        self
    }

    /// An order for a reader: from the projection when it may answer (see
    /// [`OrderHistory::usable`]) and holds it, else from the command side.
    pub async fn read_record(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<OrderRecord, OrdersError> {
        if let Some(history) = &self.history
            && history.usable().await?
            && let Some(record) = history.get(id, consistency).await?
        {
            return Ok(record);
        }
        Ok(self.read(id, consistency).await?.into())
    }

    /// A user's orders for a reader, newest first: from the projection when it
    /// may answer, else from the command side.
    pub async fn list_records(
        &self,
        user_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<OrderRecord>, OrdersError> {
        if let Some(history) = &self.history
            && history.usable().await?
        {
            return Ok(history.list(user_id, before, limit, consistency).await?);
        }
        Ok(self
            .list(user_id, before, limit, consistency)
            .await?
            .into_iter()
            .map(OrderRecord::from)
            .collect())
    }

    /// Checks and prices an order; nothing is written.
    pub async fn price(&self, request: &PlaceOrder) -> Result<Order, OrdersError> {
        if !self.payments.accepts(request.payment_method).await? {
            return Err(OrdersError::UnknownPaymentMethod);
        }
        if !self.users.user_exists(request.user_id).await? {
            return Err(OrdersError::UnknownUser);
        }
        let ids: Vec<Uuid> = request.lines.iter().map(|l| l.product_id).collect();
        let products = self.catalog.prices(&ids).await?;
        let mut unknown = Vec::new();
        let mut items = Vec::with_capacity(request.lines.len());
        let mut currency: Option<Currency> = None;
        let mut total: i64 = 0;
        for (index, line) in request.lines.iter().enumerate() {
            let Some(product) = products.iter().find(|p| p.id == line.product_id) else {
                unknown.push((index, line.product_id));
                continue;
            };
            match &currency {
                None => currency = Some(product.currency.clone()),
                Some(c) if *c != product.currency => {
                    return Err(OrdersError::MixedCurrencies);
                }
                Some(_) => {}
            }
            let unit = product.price_cents;
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
        let Some(currency) = currency else {
            return Err(StoreError::Other("an order without lines".to_owned()).into());
        };
        let now = Utc::now().trunc_subsecs(6);
        Ok(Order {
            id: Uuid::now_v7(),
            user_id: request.user_id,
            status: Status::Pending,
            step: Step::Placed,
            items,
            total_cents: total,
            currency,
            payment_method: request.payment_method,
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
        let event = NewEvent::typed(
            order.id,
            &OrderCreated {
                order_id: order.id,
                user_id: order.user_id,
                items: event_items(order),
                total_cents: order.total_cents,
                currency: order.currency.to_string(),
                at: Some(order.created_at),
            },
        )?;
        scaleshop_events::append(&mut tx, &event).await?;
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
        let at = scaleshop_db::clock::now().max(order.updated_at);
        let event = NewEvent::typed(
            order.id,
            &OrderCancelled {
                order_id: order.id,
                user_id: order.user_id,
                at: Some(at),
            },
        )?;
        let mut tx = self.store.db().begin().await?;
        let cancelled = self
            .store
            .finish(
                &mut tx,
                &order,
                &[Step::Placed, Step::Reserved],
                Ending {
                    status: Status::Cancelled,
                    reason: None,
                    at,
                },
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
