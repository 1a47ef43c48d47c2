//! The order-history projection, the read side of orders (CQRS): one row per
//! order in `order_history`, with its items, totals and status timeline, built
//! only from `order.*` events by the `order-history` consumer (in the delivery's
//! transaction, so each event is applied once). `GET /v1/orders` and
//! `GET /v1/orders/{id}` read it: a read first waits (at most
//! `projection_wait`) until the consumer has handled the log up to the head as
//! it is at the read, else the command side (`orders`) answers; an order the
//! view does not hold yet is read from the command side too, so a placed order
//! is never a 404.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_contracts::{OrderCancelled, OrderCreated, OrderFailed, OrderProcessed};
use scaleshop_db::sqlx::{self, FromRow, types::Json};
use scaleshop_db::{Consistency, Database, StoreError, Tx, read_with, with_tx};
use scaleshop_events::projection::{Table, on_table};
use scaleshop_events::{Consumer, Event, EventSet, HandlerError, Projection};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{FailureReason, Order, OrderLine, Status};
use scaleshop_payments::domain::Currency;

/// The consumer's name: its position, and the `projection` label of
/// `projection_lag`.
pub const CONSUMER: &str = "order-history";

/// The consumer of a rebuild's new copy.
pub const REBUILD_CONSUMER: &str = "order-history.rebuild";

/// The projection's table, as `0003_order_history.sql` makes it: a migration that changes
/// the table changes this too (the rebuild test compares the two).
pub static TABLE: Table = Table {
    name: "order_history",
    shadow: "order_history_next",
    sqlite: "CREATE TABLE {table} (order_id BLOB PRIMARY KEY, user_id BLOB NOT NULL, \
             status TEXT NOT NULL, items TEXT NOT NULL, total_cents INTEGER NOT NULL, \
             currency TEXT NOT NULL, failure_reason TEXT, created_at TEXT NOT NULL, \
             updated_at TEXT NOT NULL, timeline TEXT NOT NULL)",
    postgres: "CREATE TABLE {table} (order_id UUID PRIMARY KEY, user_id UUID NOT NULL, \
               status TEXT NOT NULL, items JSONB NOT NULL, total_cents BIGINT NOT NULL, \
               currency TEXT NOT NULL, failure_reason TEXT, created_at TIMESTAMPTZ NOT NULL, \
               updated_at TIMESTAMPTZ NOT NULL, timeline JSONB NOT NULL)",
    indexes: &[("user", "(user_id, order_id)")],
};

/// A change of status, as the timeline shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TimelineEntry {
    pub status: Status,
    pub at: DateTime<Utc>,
}

/// An order as the projection holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: Status,
    pub items: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: Currency,
    pub failure_reason: Option<FailureReason>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub timeline: Vec<TimelineEntry>,
}

impl From<Order> for OrderRecord {
    /// The command side's order, with the timeline its row implies.
    fn from(order: Order) -> Self {
        let mut timeline = vec![TimelineEntry {
            status: Status::Pending,
            at: order.created_at,
        }];
        if order.status != Status::Pending {
            timeline.push(TimelineEntry {
                status: order.status,
                at: order.updated_at,
            });
        }
        Self {
            id: order.id,
            user_id: order.user_id,
            status: order.status,
            items: order.items,
            total_cents: order.total_cents,
            currency: order.currency,
            failure_reason: order.failure_reason,
            created_at: order.created_at,
            updated_at: order.updated_at,
            timeline,
        }
    }
}

#[derive(Debug, FromRow)]
struct Row {
    order_id: Uuid,
    user_id: Uuid,
    status: String,
    items: Json<Vec<OrderLine>>,
    total_cents: i64,
    currency: String,
    failure_reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    timeline: Json<Vec<TimelineEntry>>,
}

impl TryFrom<Row> for OrderRecord {
    type Error = StoreError;

    fn try_from(row: Row) -> Result<Self, StoreError> {
        let corrupt = |what: &str, raw: &str| {
            StoreError::Other(format!(
                "order_history row {}: bad {what} {raw:?}",
                row.order_id
            ))
        };
        Ok(Self {
            id: row.order_id,
            user_id: row.user_id,
            status: row
                .status
                .parse()
                .map_err(|_| corrupt("status", &row.status))?,
            currency: row
                .currency
                .parse()
                .map_err(|_| corrupt("currency", &row.currency))?,
            failure_reason: match row.failure_reason.as_deref() {
                None => None,
                Some(raw) => Some(raw.parse().map_err(|_| corrupt("failure_reason", raw))?),
            },
            items: row.items.0,
            total_cents: row.total_cents,
            created_at: row.created_at,
            updated_at: row.updated_at,
            timeline: row.timeline.0,
        })
    }
}

const COLUMNS: &str = "order_id, user_id, status, items, total_cents, currency, failure_reason, \
                       created_at, updated_at, timeline";

/// Reads of the projection.
#[derive(Debug, Clone)]
pub struct OrderHistory {
    db: Database,
    wait: Duration,
}

impl OrderHistory {
    pub fn new(db: Database, wait: Duration) -> Self {
        Self { db, wait }
    }

    /// May the projection answer a read? Not while it is being rebuilt;
    /// otherwise once the consumer has handled the log up to its head as it is
    /// now (every write committed before the read), waiting at most
    /// `projection_wait`.
    pub async fn usable(&self) -> Result<bool, StoreError> {
        scaleshop_events::projection::serving(&self.db, CONSUMER, self.wait).await
    }

    /// One order (may be served by a replica within `consistency`).
    pub async fn get(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<Option<OrderRecord>, StoreError> {
        const Q: &str = "SELECT order_id, user_id, status, items, total_cents, currency, \
                         failure_reason, created_at, updated_at, timeline FROM order_history \
                         WHERE order_id = $1";
        debug_assert!(Q.contains(COLUMNS));
        let row: Option<Row> = read_with!(self.db, consistency, pool => {
            sqlx::query_as(Q).bind(id).fetch_optional(pool).await?
        })?;
        row.map(OrderRecord::try_from).transpose()
    }

    /// A user's orders, newest first, before `before`.
    pub async fn list(
        &self,
        user_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<OrderRecord>, StoreError> {
        const Q: &str = "SELECT order_id, user_id, status, items, total_cents, currency, \
                         failure_reason, created_at, updated_at, timeline FROM order_history \
                         WHERE user_id = $1 AND ($2 IS NULL OR order_id < $2) \
                         ORDER BY order_id DESC LIMIT $3";
        let rows: Vec<Row> = read_with!(self.db, consistency, pool => {
            sqlx::query_as(Q).bind(user_id).bind(before).bind(limit).fetch_all(pool).await?
        })?;
        rows.into_iter().map(OrderRecord::try_from).collect()
    }
}

scaleshop_contracts::event_set! {
    /// The events the projection follows.
    #[derive(Debug)]
    enum Changes {
        Created(OrderCreated),
        Processed(OrderProcessed),
        Failed(OrderFailed),
        Cancelled(OrderCancelled),
    }
}

/// Builds `order_history` from `order.*` events (the default instance; its
/// [`Projection::shadow`] builds a rebuild's `order_history_next`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderHistoryProjection {
    shadow: bool,
}

impl OrderHistoryProjection {
    /// The table this instance writes.
    fn table(&self) -> &'static str {
        TABLE.named(self.shadow)
    }
}

#[async_trait]
impl Consumer for OrderHistoryProjection {
    fn name(&self) -> &'static str {
        if self.shadow {
            REBUILD_CONSUMER
        } else {
            CONSUMER
        }
    }

    fn wants(&self, event_type: &str) -> bool {
        Changes::wants(event_type)
    }

    fn is_projection(&self) -> bool {
        true
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        let Some(change) = Changes::decode(event)? else {
            return Ok(());
        };
        let (id, status, reason, at) = match change {
            Changes::Created(e) => {
                let at = e.at.unwrap_or(event.occurred_at);
                let currency: Currency = e.currency.parse().map_err(|_| {
                    HandlerError::permanent(format!(
                        "order {}: currency {:?}",
                        e.order_id, e.currency
                    ))
                })?;
                let items: Vec<OrderLine> = e
                    .items
                    .iter()
                    .map(|i| OrderLine {
                        product_id: i.product_id,
                        quantity: i.quantity,
                        unit_price_cents: i.unit_price_cents,
                    })
                    .collect();
                let timeline = vec![TimelineEntry {
                    status: Status::Pending,
                    at,
                }];
                const Q: &str = "INSERT INTO {table} (order_id, user_id, status, items, \
                                 total_cents, currency, failure_reason, created_at, updated_at, timeline) \
                                 VALUES ($1, $2, 'pending', $3, $4, $5, NULL, $6, $6, $7) \
                                 ON CONFLICT (order_id) DO NOTHING";
                with_tx!(tx, conn => {
                    sqlx::query(on_table(Q, self.table()))
                        .bind(e.order_id)
                        .bind(e.user_id)
                        .bind(Json(&items))
                        .bind(e.total_cents)
                        .bind(currency.to_string())
                        .bind(at)
                        .bind(Json(&timeline))
                        .execute(conn)
                        .await
                        .map_err(StoreError::from)?;
                });
                return Ok(());
            }
            Changes::Processed(e) => (e.order_id, Status::Completed, None, e.at),
            Changes::Failed(e) => {
                let reason: FailureReason = e.reason.parse().map_err(|_| {
                    HandlerError::permanent(format!("order {}: reason {:?}", e.order_id, e.reason))
                })?;
                (e.order_id, Status::Failed, Some(reason), e.at)
            }
            Changes::Cancelled(e) => (e.order_id, Status::Cancelled, None, e.at),
        };
        let at = at.unwrap_or(event.occurred_at);
        const TIMELINE: &str = "SELECT timeline FROM {table} WHERE order_id = $1";
        let timeline: Option<Json<Vec<TimelineEntry>>> = with_tx!(tx, conn => {
            sqlx::query_scalar(on_table(TIMELINE, self.table()))
                .bind(id)
                .fetch_optional(conn)
                .await
                .map_err(StoreError::from)?
        });
        // Its `order.created` comes first in the log; an order without one is not
        // an order this view can show.
        let Some(Json(mut timeline)) = timeline else {
            return Ok(());
        };
        timeline.push(TimelineEntry { status, at });
        const Q: &str = "UPDATE {table} SET status = $2, failure_reason = $3, \
                         updated_at = $4, timeline = $5 WHERE order_id = $1";
        with_tx!(tx, conn => {
            sqlx::query(on_table(Q, self.table()))
                .bind(id)
                .bind(status.as_str())
                .bind(reason.map(FailureReason::as_str))
                .bind(at)
                .bind(Json(&timeline))
                .execute(conn)
                .await
                .map_err(StoreError::from)?;
        });
        Ok(())
    }
}

#[async_trait]
impl Projection for OrderHistoryProjection {
    fn tables(&self) -> &'static [Table] {
        std::slice::from_ref(&TABLE)
    }

    fn shadow(&self) -> Arc<dyn Projection> {
        Arc::new(Self { shadow: true })
    }

    async fn digest(&self, db: &Database) -> Result<(u64, String), StoreError> {
        const Q: &str = "SELECT order_id, user_id, status, items, total_cents, currency, \
                         failure_reason, created_at, updated_at, timeline FROM {table} \
                         ORDER BY order_id";
        let rows: Vec<Row> = scaleshop_db::with_pool!(db, pool => {
            sqlx::query_as(on_table(Q, self.table())).fetch_all(pool).await?
        });
        let mut digest = scaleshop_events::projection::Digest::default();
        for row in rows {
            digest.row(&OrderRecord::try_from(row)?);
        }
        Ok(digest.finish())
    }
}
