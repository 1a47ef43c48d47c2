//! Payments. The [`PaymentGateway`] port and the built-in [`SandboxGateway`], which
//! takes test tokens in the manner of well-known providers and keeps a ledger of
//! every charge attempt that reached it (so a double charge would be visible). The
//! gateway de-duplicates by idempotency key: a second charge with the same key
//! returns the first final answer and charges nothing.
//!
//! [`Payments::charge`] records the outcome for the order once and publishes
//! `payment.succeeded` or `payment.failed` with it.

pub mod http;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Database, Migrations, StoreError, with_pool, with_tx};
use scaleshop_events::NewEvent;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

pub mod events {
    pub const SUCCEEDED: &str = "payment.succeeded";
    pub const FAILED: &str = "payment.failed";
}

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "payments",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// A charge to make.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub idempotency_key: String,
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    pub method: String,
}

/// A final answer of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded,
    Declined,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Worth retrying (the provider failed).
    #[error("provider error: {0}")]
    Transient(String),
    /// Never worth retrying (an unknown payment method).
    #[error("invalid charge: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A payment provider.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// Whether `method` is a payment method this gateway takes.
    fn accepts(&self, method: &str) -> bool;
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, GatewayError>;
}

/// A ledger entry, as the admin API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, FromRow, utoipa::ToSchema)]
pub struct LedgerEntry {
    pub id: Uuid,
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
    /// `succeeded`, `declined` or `error`.
    pub status: String,
    pub idempotency_key: String,
    pub created_at: DateTime<Utc>,
}

/// The sandbox: `pm_card_visa` and `pm_card_mastercard` succeed,
/// `pm_card_chargeDeclined` is declined, `pm_card_processingError` fails as a
/// provider error (every time).
#[derive(Debug, Clone)]
pub struct SandboxGateway {
    db: Database,
}

pub const SANDBOX_METHODS: [&str; 4] = [
    "pm_card_visa",
    "pm_card_mastercard",
    "pm_card_chargeDeclined",
    "pm_card_processingError",
];

impl SandboxGateway {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    async fn final_answer(&self, key: &str) -> Result<Option<ChargeOutcome>, StoreError> {
        const Q: &str = "SELECT status FROM payment_ledger WHERE idempotency_key = $1 \
                         AND status IN ('succeeded', 'declined')";
        let status: Option<String> = with_pool!(self.db, pool => sqlx::query_scalar(Q).bind(key).fetch_optional(pool).await?);
        Ok(status.map(|s| {
            if s == "succeeded" {
                ChargeOutcome::Succeeded
            } else {
                ChargeOutcome::Declined
            }
        }))
    }

    async fn record(&self, request: &ChargeRequest, status: &str) -> Result<(), StoreError> {
        const Q: &str = "INSERT INTO payment_ledger (id, order_id, amount_cents, currency, method, status, \
                         idempotency_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        let mut tx = self.db.begin().await?;
        with_tx!(&mut tx, conn => {
            sqlx::query(Q)
                .bind(Uuid::now_v7())
                .bind(request.order_id)
                .bind(request.amount_cents)
                .bind(&request.currency)
                .bind(&request.method)
                .bind(status)
                .bind(&request.idempotency_key)
                .bind(now())
                .execute(conn)
                .await?;
        });
        tx.commit().await
    }
}

#[async_trait]
impl PaymentGateway for SandboxGateway {
    fn accepts(&self, method: &str) -> bool {
        SANDBOX_METHODS.contains(&method)
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, GatewayError> {
        if let Some(answer) = self.final_answer(&request.idempotency_key).await? {
            return Ok(answer);
        }
        let (status, outcome) = match request.method.as_str() {
            "pm_card_visa" | "pm_card_mastercard" => ("succeeded", ChargeOutcome::Succeeded),
            "pm_card_chargeDeclined" => ("declined", ChargeOutcome::Declined),
            "pm_card_processingError" => {
                self.record(request, "error").await?;
                return Err(GatewayError::Transient("processing error".into()));
            }
            other => {
                return Err(GatewayError::Invalid(format!(
                    "unknown payment method {other:?}"
                )));
            }
        };
        match self.record(request, status).await {
            Ok(()) => Ok(outcome),
            // A concurrent charge with the same key answered first: its answer stands.
            Err(StoreError::Conflict(_)) => self
                .final_answer(&request.idempotency_key)
                .await?
                .ok_or_else(|| {
                    GatewayError::Store(StoreError::Other(
                        "ledger conflict without an entry".into(),
                    ))
                }),
            Err(e) => Err(e.into()),
        }
    }
}

/// What a charge of an order came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentResult {
    Succeeded,
    Declined,
    /// The provider kept failing; no more attempts.
    Error,
}

impl PaymentResult {
    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Declined => "declined",
            Self::Error => "error",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "succeeded" => Some(Self::Succeeded),
            "declined" => Some(Self::Declined),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentsError {
    /// Try again later.
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The payment service's in-process API.
#[derive(Clone)]
pub struct Payments {
    db: Database,
    gateway: Arc<dyn PaymentGateway>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Payments")
    }
}

impl Payments {
    pub fn new(db: Database, gateway: Arc<dyn PaymentGateway>) -> Self {
        Self { db, gateway }
    }

    pub fn accepts(&self, method: &str) -> bool {
        self.gateway.accepts(method)
    }

    /// Charges an order, once: the gateway key is derived from the order, and the
    /// outcome is recorded (with its event) the first time only. A provider error is
    /// `Transient` unless `last_attempt`, when it becomes the final `Error`.
    pub async fn charge(
        &self,
        order_id: Uuid,
        amount_cents: i64,
        currency: &str,
        method: &str,
        last_attempt: bool,
    ) -> Result<PaymentResult, PaymentsError> {
        const KNOWN: &str = "SELECT status FROM payments WHERE order_id = $1";
        let known: Option<String> = with_pool!(self.db, pool => sqlx::query_scalar(KNOWN).bind(order_id).fetch_optional(pool).await.map_err(StoreError::from)?);
        if let Some(result) = known.as_deref().and_then(PaymentResult::parse) {
            return Ok(result);
        }
        let request = ChargeRequest {
            idempotency_key: format!("order-{order_id}"),
            order_id,
            amount_cents,
            currency: currency.to_owned(),
            method: method.to_owned(),
        };
        let result = match self.gateway.charge(&request).await {
            Ok(ChargeOutcome::Succeeded) => PaymentResult::Succeeded,
            Ok(ChargeOutcome::Declined) => PaymentResult::Declined,
            Err(GatewayError::Transient(e)) if !last_attempt => {
                return Err(PaymentsError::Transient(e));
            }
            Err(GatewayError::Transient(_)) => PaymentResult::Error,
            Err(GatewayError::Invalid(e)) => return Err(PaymentsError::Invalid(e)),
            Err(GatewayError::Store(e)) => return Err(e.into()),
        };
        self.record(&request, result).await
    }

    async fn record(
        &self,
        request: &ChargeRequest,
        result: PaymentResult,
    ) -> Result<PaymentResult, PaymentsError> {
        const INSERT: &str = "INSERT INTO payments (order_id, status, created_at) VALUES ($1, $2, $3) \
                              ON CONFLICT (order_id) DO NOTHING";
        const KNOWN: &str = "SELECT status FROM payments WHERE order_id = $1";
        let mut tx = self.db.begin().await?;
        let inserted = with_tx!(&mut tx, conn => {
            sqlx::query(INSERT).bind(request.order_id).bind(result.as_str()).bind(now()).execute(conn).await
                .map_err(StoreError::from)?.rows_affected()
        });
        if inserted == 0 {
            tx.rollback().await?;
            let known: Option<String> = with_pool!(self.db, pool => {
                sqlx::query_scalar(KNOWN).bind(request.order_id).fetch_optional(pool).await.map_err(StoreError::from)?
            });
            return Ok(known
                .as_deref()
                .and_then(PaymentResult::parse)
                .unwrap_or(result));
        }
        let data = json!({
            "order_id": request.order_id,
            "amount_cents": request.amount_cents,
            "currency": request.currency,
            "idempotency_key": request.idempotency_key,
            "reason": match result {
                PaymentResult::Succeeded => serde_json::Value::Null,
                PaymentResult::Declined => json!("payment_declined"),
                PaymentResult::Error => json!("payment_error"),
            },
        });
        let kind = if result == PaymentResult::Succeeded {
            events::SUCCEEDED
        } else {
            events::FAILED
        };
        scaleshop_events::append(&mut tx, &NewEvent::new(kind, request.order_id, data)).await?;
        tx.commit().await?;
        Ok(result)
    }

    /// The gateway's ledger entries for an order, oldest first.
    pub async fn ledger(&self, order_id: Uuid) -> Result<Vec<LedgerEntry>, StoreError> {
        const Q: &str = "SELECT id, order_id, amount_cents, currency, status, idempotency_key, created_at \
                         FROM payment_ledger WHERE order_id = $1 ORDER BY created_at, id";
        Ok(with_pool!(self.db, pool => sqlx::query_as(Q).bind(order_id).fetch_all(pool).await?))
    }
}
