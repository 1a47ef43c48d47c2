//! Order storage (one SQL text for both backends).

use chrono::{DateTime, Utc};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow, types::Json};
use scaleshop_db::{
    Consistency, Database, Migrations, StoreError, Tx, read_with, with_pool, with_tx,
};
use scaleshop_events::NewEvent;
use uuid::Uuid;

use crate::domain::{FailureReason, Order, OrderLine, Status, Step};

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "orders",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

#[derive(Debug, FromRow)]
struct Row {
    id: Uuid,
    user_id: Uuid,
    status: String,
    step: String,
    items: Json<Vec<OrderLine>>,
    total_cents: i64,
    currency: String,
    payment_method: String,
    failure_reason: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<Row> for Order {
    type Error = StoreError;

    fn try_from(row: Row) -> Result<Self, StoreError> {
        let corrupt = |what: &str, raw: &str| {
            StoreError::Other(format!("orders row {}: bad {what} {raw:?}", row.id))
        };
        Ok(Self {
            id: row.id,
            user_id: row.user_id,
            status: row
                .status
                .parse()
                .map_err(|_| corrupt("status", &row.status))?,
            step: row.step.parse().map_err(|_| corrupt("step", &row.step))?,
            currency: row
                .currency
                .parse()
                .map_err(|_| corrupt("currency", &row.currency))?,
            payment_method: row
                .payment_method
                .parse()
                .map_err(|_| corrupt("payment_method", &row.payment_method))?,
            failure_reason: match row.failure_reason.as_deref() {
                None => None,
                Some(raw) => Some(raw.parse().map_err(|_| corrupt("failure_reason", raw))?),
            },
            items: row.items.0,
            total_cents: row.total_cents,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

const COLUMNS: &str = "id, user_id, status, step, items, total_cents, currency, payment_method, failure_reason, \
                       created_at, updated_at";

#[derive(Debug, Clone)]
pub struct OrderStore {
    db: Database,
}

/// How an order ends: its final status, the reason of a failure, and the time
/// (the order's `updated_at`, and the `at` of its event).
#[derive(Debug, Clone, Copy)]
pub struct Ending {
    pub status: Status,
    pub reason: Option<FailureReason>,
    pub at: DateTime<Utc>,
}

impl OrderStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Inserts in the caller's transaction.
    pub async fn insert(tx: &mut Tx, order: &Order) -> Result<(), StoreError> {
        const Q: &str = "INSERT INTO orders (id, user_id, status, step, items, total_cents, currency, payment_method, \
                         failure_reason, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
        with_tx!(tx, conn => {
            sqlx::query(Q)
                .bind(order.id)
                .bind(order.user_id)
                .bind(order.status.as_str())
                .bind(order.step.as_str())
                .bind(Json(&order.items))
                .bind(order.total_cents)
                .bind(order.currency.as_str())
                .bind(order.payment_method.as_str())
                .bind(order.failure_reason.map(FailureReason::as_str))
                .bind(order.created_at)
                .bind(order.updated_at)
                .execute(conn)
                .await?;
        });
        Ok(())
    }

    /// An order as a read replica (within `consistency`) or the primary has it.
    pub async fn read(
        &self,
        id: Uuid,
        consistency: Consistency,
    ) -> Result<Option<Order>, StoreError> {
        const Q: &str = "SELECT id, user_id, status, step, items, total_cents, currency, payment_method, \
                         failure_reason, created_at, updated_at FROM orders WHERE id = $1";
        let row: Option<Row> = read_with!(self.db, consistency, pool => {
            sqlx::query_as(Q).bind(id).fetch_optional(pool).await?
        })?;
        row.map(Order::try_from).transpose()
    }

    /// The primary's copy (for a read-modify-write).
    pub async fn get(&self, id: Uuid) -> Result<Option<Order>, StoreError> {
        const Q: &str = "SELECT id, user_id, status, step, items, total_cents, currency, payment_method, \
                         failure_reason, created_at, updated_at FROM orders WHERE id = $1";
        debug_assert!(Q.contains(COLUMNS));
        let row: Option<Row> =
            with_pool!(self.db, pool => sqlx::query_as(Q).bind(id).fetch_optional(pool).await?);
        row.map(Order::try_from).transpose()
    }

    /// A user's orders, newest first, before `before` (may be served by a replica).
    pub async fn list(
        &self,
        user_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<Order>, StoreError> {
        const Q: &str = "SELECT id, user_id, status, step, items, total_cents, currency, payment_method, \
                         failure_reason, created_at, updated_at FROM orders WHERE user_id = $1 \
                         AND ($2 IS NULL OR id < $2) ORDER BY id DESC LIMIT $3";
        let rows: Vec<Row> = read_with!(self.db, consistency, pool => {
            sqlx::query_as(Q).bind(user_id).bind(before).bind(limit).fetch_all(pool).await?
        })?;
        rows.into_iter().map(Order::try_from).collect()
    }

    /// Moves a pending order from one of `from` to `to`; false if it was elsewhere.
    pub async fn advance(
        &self,
        tx: &mut Tx,
        id: Uuid,
        from: &[Step],
        to: Step,
    ) -> Result<bool, StoreError> {
        const Q: &str = "UPDATE orders SET step = $3, updated_at = $4 WHERE id = $1 AND status = 'pending' \
                         AND (step = $2 OR step = $5)";
        let first = from.first().map_or("", |s| s.as_str());
        let second = from.get(1).map_or(first, |s| s.as_str());
        let done = with_tx!(tx, conn => {
            sqlx::query(Q).bind(id).bind(first).bind(to.as_str()).bind(now()).bind(second)
                .execute(conn).await?.rows_affected()
        });
        Ok(done == 1)
    }

    /// Ends a pending order (completed, failed or cancelled) and appends its event,
    /// in the caller's transaction; false (and no event) if it was not pending in
    /// one of `from`.
    pub async fn finish(
        &self,
        tx: &mut Tx,
        order: &Order,
        from: &[Step],
        ending: Ending,
        event: &NewEvent,
    ) -> Result<bool, StoreError> {
        let Ending { status, reason, at } = ending;
        const Q: &str = "UPDATE orders SET status = $2, step = 'done', failure_reason = $3, updated_at = $4 \
                         WHERE id = $1 AND status = 'pending' AND (step = $5 OR step = $6 OR step = $7)";
        let step = |i: usize| from.get(i).or(from.first()).map_or("", |s| s.as_str());
        let done = with_tx!(&mut *tx, conn => {
            sqlx::query(Q)
                .bind(order.id)
                .bind(status.as_str())
                .bind(reason.map(FailureReason::as_str))
                .bind(at)
                .bind(step(0))
                .bind(step(1))
                .bind(step(2))
                .execute(conn)
                .await?
                .rows_affected()
        });
        if done == 1 {
            scaleshop_events::append(tx, event).await?;
        }
        Ok(done == 1)
    }
}
