//! Payments storage (one SQL text for both backends): the outcome of each order's
//! charge (`payments`) and the sandbox gateway's ledger (`payment_ledger`). Text
//! columns are read back through the domain's parsed types.

use chrono::{DateTime, Utc};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{
    Consistency, Database, Migrations, StoreError, Tx, read_with, with_pool, with_tx,
};
use uuid::Uuid;

use crate::domain::{ChargeOutcome, ChargeRequest, LedgerEntry, LedgerStatus, PaymentResult};

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "payments",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

fn corrupt(table: &str, what: &str, raw: &str) -> StoreError {
    StoreError::Other(format!("{table}: bad {what} {raw:?}"))
}

/// The recorded outcome of an order's charge, if any.
pub async fn result_of(db: &Database, order_id: Uuid) -> Result<Option<PaymentResult>, StoreError> {
    const Q: &str = "SELECT status FROM payments WHERE order_id = $1";
    let status: Option<String> =
        with_pool!(db, pool => sqlx::query_scalar(Q).bind(order_id).fetch_optional(pool).await?);
    status
        .map(|s| s.parse().map_err(|_| corrupt("payments", "status", &s)))
        .transpose()
}

/// Records the outcome of an order's charge in the caller's transaction; false
/// when one was recorded already (it stands).
pub async fn insert_result(
    tx: &mut Tx,
    order_id: Uuid,
    result: PaymentResult,
) -> Result<bool, StoreError> {
    const INSERT: &str = "INSERT INTO payments (order_id, status, created_at) VALUES ($1, $2, $3) \
                          ON CONFLICT (order_id) DO NOTHING";
    let inserted = with_tx!(tx, conn => {
        sqlx::query(INSERT).bind(order_id).bind(result.as_str()).bind(now()).execute(conn).await?.rows_affected()
    });
    Ok(inserted == 1)
}

/// The ledger's final answer (succeeded or declined) under an idempotency key.
pub async fn final_answer(db: &Database, key: &str) -> Result<Option<ChargeOutcome>, StoreError> {
    const Q: &str = "SELECT status FROM payment_ledger WHERE idempotency_key = $1 \
                     AND status IN ('succeeded', 'declined')";
    let status: Option<String> =
        with_pool!(db, pool => sqlx::query_scalar(Q).bind(key).fetch_optional(pool).await?);
    let Some(raw) = status else {
        return Ok(None);
    };
    match raw.parse() {
        Ok(LedgerStatus::Succeeded) => Ok(Some(ChargeOutcome::Succeeded)),
        Ok(LedgerStatus::Declined) => Ok(Some(ChargeOutcome::Declined)),
        Ok(LedgerStatus::Error) | Err(_) => Err(corrupt("payment_ledger", "status", &raw)),
    }
}

/// Appends a charge attempt to the ledger. A second final answer under one key is
/// refused by a partial unique index (`StoreError::Conflict`).
pub async fn record_attempt(
    db: &Database,
    request: &ChargeRequest,
    status: LedgerStatus,
) -> Result<(), StoreError> {
    const Q: &str = "INSERT INTO payment_ledger (id, order_id, amount_cents, currency, method, status, \
                     idempotency_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
    let mut tx = db.begin().await?;
    with_tx!(&mut tx, conn => {
        sqlx::query(Q)
            .bind(Uuid::now_v7())
            .bind(request.order_id)
            .bind(request.amount_cents)
            .bind(request.currency.as_str())
            .bind(request.method.as_str())
            .bind(status.as_str())
            .bind(&request.idempotency_key)
            .bind(now())
            .execute(conn)
            .await?;
    });
    tx.commit().await
}

#[derive(Debug, FromRow)]
struct LedgerRow {
    id: Uuid,
    order_id: Uuid,
    amount_cents: i64,
    currency: String,
    status: String,
    idempotency_key: String,
    created_at: DateTime<Utc>,
}

impl TryFrom<LedgerRow> for LedgerEntry {
    type Error = StoreError;

    fn try_from(row: LedgerRow) -> Result<Self, StoreError> {
        Ok(Self {
            currency: row
                .currency
                .parse()
                .map_err(|_| corrupt("payment_ledger", "currency", &row.currency))?,
            status: row
                .status
                .parse()
                .map_err(|_| corrupt("payment_ledger", "status", &row.status))?,
            id: row.id,
            order_id: row.order_id,
            amount_cents: row.amount_cents,
            idempotency_key: row.idempotency_key,
            created_at: row.created_at,
        })
    }
}

/// The ledger entries of an order, oldest first (may be served by a read replica
/// within `consistency`).
pub async fn ledger(
    db: &Database,
    order_id: Uuid,
    consistency: Consistency,
) -> Result<Vec<LedgerEntry>, StoreError> {
    const Q: &str = "SELECT id, order_id, amount_cents, currency, status, idempotency_key, created_at \
                     FROM payment_ledger WHERE order_id = $1 ORDER BY created_at, id";
    let rows: Vec<LedgerRow> = read_with!(db, consistency, pool => sqlx::query_as(Q).bind(order_id).fetch_all(pool).await?)?;
    rows.into_iter().map(LedgerEntry::try_from).collect()
}
