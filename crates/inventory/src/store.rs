//! Inventory storage (one SQL text for both backends): stock rows changed only by
//! conditional updates, reservations per order, the adjustment log.

use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow, types::Json};
use scaleshop_db::{Database, Migrations, StoreError, Tx, with_pool, with_tx};
use uuid::Uuid;

use crate::domain::{Line, Reservation, Settlement, Stock};

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "inventory",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

#[derive(Debug, FromRow)]
struct StockRow {
    product_id: Uuid,
    available: i64,
    reserved: i64,
    sold: i64,
}

impl From<StockRow> for Stock {
    fn from(row: StockRow) -> Self {
        Self {
            product_id: row.product_id,
            available: row.available,
            reserved: row.reserved,
            sold: row.sold,
        }
    }
}

const STOCK: &str = "SELECT product_id, available, reserved, sold FROM stock WHERE product_id = $1";

pub async fn get(db: &Database, product_id: Uuid) -> Result<Option<Stock>, StoreError> {
    let row: Option<StockRow> =
        with_pool!(db, pool => sqlx::query_as(STOCK).bind(product_id).fetch_optional(pool).await?);
    Ok(row.map(Stock::from))
}

/// The stock records of several products (those that have one), in one read.
pub async fn get_many(db: &Database, product_ids: &[Uuid]) -> Result<Vec<Stock>, StoreError> {
    if product_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Only numbered placeholders are put into the text; the ids are bound.
    let q = format!(
        "SELECT product_id, available, reserved, sold FROM stock WHERE product_id IN ({})",
        scaleshop_db::placeholders(1, product_ids.len())
    );
    let rows: Vec<StockRow> = with_pool!(db, pool => {
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(q.clone()));
        for id in product_ids {
            query = query.bind(*id);
        }
        query.fetch_all(pool).await?
    });
    Ok(rows.into_iter().map(Stock::from).collect())
}

/// The stock record a `product.created` makes (nothing if it is there already).
pub async fn create_stock(tx: &mut Tx, product_id: Uuid, initial: i64) -> Result<(), StoreError> {
    let at = now();
    const Q: &str = "INSERT INTO stock (product_id, available, reserved, sold, updated_at) \
                     VALUES ($1, $2, 0, 0, $3) ON CONFLICT (product_id) DO NOTHING";
    with_tx!(tx, conn => {
        sqlx::query(Q).bind(product_id).bind(initial).bind(at).execute(conn).await?;
    });
    Ok(())
}

/// Adds `delta` to `available` and logs it, in the caller's transaction; `None`
/// (nothing changed) when the result would be negative.
pub async fn adjust(
    tx: &mut Tx,
    product_id: Uuid,
    delta: i64,
    reason: &str,
) -> Result<Option<Stock>, StoreError> {
    let at = now();
    const UPDATE: &str = "UPDATE stock SET available = available + $2, updated_at = $3 \
                          WHERE product_id = $1 AND available + $2 >= 0";
    const LOG: &str = "INSERT INTO stock_adjustments (id, product_id, delta, reason, created_at) \
                       VALUES ($1, $2, $3, $4, $5)";
    let row: Option<StockRow> = with_tx!(tx, conn => {
        let done = sqlx::query(UPDATE).bind(product_id).bind(delta).bind(at).execute(&mut *conn).await?;
        if done.rows_affected() == 1 {
            sqlx::query(LOG).bind(Uuid::now_v7()).bind(product_id).bind(delta).bind(reason).bind(at)
                .execute(&mut *conn).await?;
            sqlx::query_as(STOCK).bind(product_id).fetch_optional(conn).await?
        } else {
            None
        }
    });
    Ok(row.map(Stock::from))
}

/// Claims the order's reservation (state `reserved`) in the caller's transaction;
/// false when the order already has one (decided earlier).
pub async fn claim(tx: &mut Tx, order_id: Uuid, lines: &[Line]) -> Result<bool, StoreError> {
    let at = now();
    const CLAIM: &str = "INSERT INTO reservations (order_id, state, items, created_at, updated_at) \
                         VALUES ($1, 'reserved', $2, $3, $3) ON CONFLICT (order_id) DO NOTHING";
    let claimed = with_tx!(tx, conn => {
        sqlx::query(CLAIM).bind(order_id).bind(Json(lines)).bind(at).execute(conn).await?.rows_affected()
    });
    Ok(claimed == 1)
}

/// What taking one line from stock came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Taken,
    /// The product has a record, with fewer units available.
    Short,
    /// The product has no stock record (yet).
    NoRecord,
}

/// Moves one line from `available` to `reserved`, in the caller's transaction.
pub async fn take(tx: &mut Tx, line: &Line) -> Result<Take, StoreError> {
    let at = now();
    const TAKE: &str = "UPDATE stock SET available = available - $2, reserved = reserved + $2, updated_at = $3 \
                        WHERE product_id = $1 AND available >= $2";
    const EXISTS: &str = "SELECT COUNT(*) FROM stock WHERE product_id = $1";
    Ok(with_tx!(tx, conn => {
        let taken = sqlx::query(TAKE).bind(line.product_id).bind(line.quantity).bind(at)
            .execute(&mut *conn).await?.rows_affected();
        if taken == 1 {
            Take::Taken
        } else {
            let exists: i64 = sqlx::query_scalar(EXISTS).bind(line.product_id).fetch_one(&mut *conn).await?;
            // Each statement reads its own snapshot (PostgreSQL, read
            // committed): a stock record committed after the first take
            // began is seen here. Take again, so that only a record that
            // existed before the take counts as short.
            if exists == 0 {
                Take::NoRecord
            } else if sqlx::query(TAKE).bind(line.product_id).bind(line.quantity).bind(at)
                .execute(conn).await?.rows_affected() == 1
            {
                Take::Taken
            } else {
                Take::Short
            }
        }
    }))
}

/// Records a refusal (short of `short`), unless the order has a decision already.
pub async fn reject(
    db: &Database,
    order_id: Uuid,
    lines: &[Line],
    short: Uuid,
) -> Result<(), StoreError> {
    let at = now();
    const REJECT: &str = "INSERT INTO reservations (order_id, state, items, short_product_id, created_at, \
                          updated_at) VALUES ($1, 'rejected', $2, $3, $4, $4) ON CONFLICT (order_id) DO NOTHING";
    let mut tx = db.begin().await?;
    with_tx!(&mut tx, conn => {
        sqlx::query(REJECT).bind(order_id).bind(Json(lines)).bind(short).bind(at).execute(conn).await?;
    });
    tx.commit().await
}

/// The decision recorded for an order, if any.
pub async fn decided(db: &Database, order_id: Uuid) -> Result<Option<Reservation>, StoreError> {
    const Q: &str = "SELECT state, short_product_id FROM reservations WHERE order_id = $1";
    let row: Option<(String, Option<Uuid>)> =
        with_pool!(db, pool => sqlx::query_as(Q).bind(order_id).fetch_optional(pool).await?);
    Ok(match row {
        None => None,
        Some((state, _)) if state == "reserved" || state == "sold" => Some(Reservation::Reserved),
        Some((state, _)) if state == "released" => Some(Reservation::Released),
        Some((_, Some(short))) => Some(Reservation::OutOfStock { product_id: short }),
        Some((state, None)) => {
            return Err(StoreError::Other(format!(
                "reservation of order {order_id}: state {state:?} without a short product"
            )));
        }
    })
}

/// Moves a reservation from `reserved` to `to`, adjusting stock, in the caller's
/// transaction; the lines it held, or `None` when the order holds no reservation
/// in state `reserved`.
pub async fn settle(
    tx: &mut Tx,
    order_id: Uuid,
    to: Settlement,
) -> Result<Option<Vec<Line>>, StoreError> {
    let at = now();
    const MOVE: &str = "UPDATE reservations SET state = $2, updated_at = $3 WHERE order_id = $1 AND state = 'reserved'";
    const ITEMS: &str = "SELECT items FROM reservations WHERE order_id = $1";
    const RELEASE: &str = "UPDATE stock SET available = available + $2, reserved = reserved - $2, updated_at = $3 \
                           WHERE product_id = $1 AND reserved >= $2";
    const SELL: &str = "UPDATE stock SET sold = sold + $2, reserved = reserved - $2, updated_at = $3 \
                        WHERE product_id = $1 AND reserved >= $2";
    let moved = with_tx!(&mut *tx, conn => {
        sqlx::query(MOVE).bind(order_id).bind(to.as_str()).bind(at).execute(conn).await?.rows_affected()
    });
    if moved == 0 {
        return Ok(None);
    }
    let Json(lines): Json<Vec<Line>> = with_tx!(&mut *tx, conn => {
        sqlx::query_scalar(ITEMS).bind(order_id).fetch_one(conn).await?
    });
    let sql = match to {
        Settlement::Sold => SELL,
        Settlement::Released => RELEASE,
    };
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
    Ok(Some(lines))
}
