//! Payments. The [`PaymentGateway`] port and the built-in [`SandboxGateway`], which
//! takes test tokens in the manner of well-known providers and keeps a ledger of
//! every charge attempt that reached it (so a double charge would be visible). The
//! gateway de-duplicates by idempotency key: a second charge with the same key
//! returns the first final answer and charges nothing.
//!
//! [`Payments::charge`] records the outcome for the order once and publishes
//! `payment.succeeded` or `payment.failed` with it.
//!
//! A provider error comes in two kinds: the provider said it charged nothing
//! ([`GatewayError::Transient`]), or the answer never came ([`GatewayError::Unknown`],
//! a timeout): the charge may have been made, and only asking again with the same
//! idempotency key tells. The sandbox can be made to lose answers ([`faults`]).

pub mod faults;
pub mod http;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use scaleshop_contracts::{PaymentFailed, PaymentSucceeded};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{Consistency, Database, Migrations, StoreError, read_with, with_pool, with_tx};
use scaleshop_events::NewEvent;
use serde::Serialize;
use uuid::Uuid;

use crate::faults::LostAnswers;

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
    /// Worth retrying (the provider failed and charged nothing).
    #[error("provider error: {0}")]
    Transient(String),
    /// The answer was lost (a timeout): the charge may have been made. Ask again
    /// with the same idempotency key to learn its outcome.
    #[error("no answer from the provider: {0}")]
    Unknown(String),
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
/// provider error (every time). With [`SandboxGateway::with_lost_answers`] (tests
/// only) a share of the charges it makes lose their answer.
#[derive(Debug, Clone)]
pub struct SandboxGateway {
    db: Database,
    lost_answers: Arc<LostAnswers>,
}

pub const SANDBOX_METHODS: [&str; 4] = [
    "pm_card_visa",
    "pm_card_mastercard",
    "pm_card_chargeDeclined",
    "pm_card_processingError",
];

impl SandboxGateway {
    pub fn new(db: Database) -> Self {
        Self {
            db,
            lost_answers: Arc::new(LostAnswers::default()),
        }
    }

    /// Tests only: `percent` % of the charges this gateway makes (a new final
    /// answer in the ledger) answer [`GatewayError::Unknown`] instead of their
    /// outcome. Asking again with the same key answers from the ledger, never lost.
    pub fn with_lost_answers(mut self, percent: u8) -> Self {
        self.lost_answers = Arc::new(LostAnswers::new(percent));
        if self.lost_answers.enabled() {
            tracing::warn!(
                percent,
                "the sandbox payment gateway loses answers (a test-only fault mode)"
            );
        }
        self
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
            Ok(()) if self.lost_answers.lose_next() => Err(GatewayError::Unknown(format!(
                "the answer to charge {:?} was lost (sandbox fault mode)",
                request.idempotency_key
            ))),
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
    /// Nothing was charged; try again later.
    #[error("{0}")]
    Transient(String),
    /// The charge may have been made; try again later with the same key, and do not
    /// undo what it paid for meanwhile.
    #[error("{0}")]
    Unknown(String),
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
    /// `Transient` (or `Unknown` when the answer was lost) unless `last_attempt`,
    /// when it becomes the final `Error`; a lost answer on the last attempt is asked
    /// for once more first (same key), so a charge that was made is not recorded as
    /// failed when the provider can still say so.
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
        let mut answer = self.gateway.charge(&request).await;
        if last_attempt && matches!(answer, Err(GatewayError::Unknown(_))) {
            answer = self.gateway.charge(&request).await;
        }
        let result = match answer {
            Ok(ChargeOutcome::Succeeded) => PaymentResult::Succeeded,
            Ok(ChargeOutcome::Declined) => PaymentResult::Declined,
            Err(GatewayError::Transient(e)) if !last_attempt => {
                return Err(PaymentsError::Transient(e));
            }
            Err(GatewayError::Unknown(e)) if !last_attempt => {
                return Err(PaymentsError::Unknown(e));
            }
            Err(GatewayError::Transient(_) | GatewayError::Unknown(_)) => PaymentResult::Error,
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
        let failed = |reason: &str| {
            NewEvent::typed(
                request.order_id,
                &PaymentFailed {
                    order_id: request.order_id,
                    amount_cents: request.amount_cents,
                    currency: request.currency.clone(),
                    idempotency_key: request.idempotency_key.clone(),
                    reason: reason.to_owned(),
                },
            )
        };
        let event = match result {
            PaymentResult::Succeeded => NewEvent::typed(
                request.order_id,
                &PaymentSucceeded {
                    order_id: request.order_id,
                    amount_cents: request.amount_cents,
                    currency: request.currency.clone(),
                    idempotency_key: request.idempotency_key.clone(),
                    reason: None,
                },
            ),
            PaymentResult::Declined => failed("payment_declined"),
            PaymentResult::Error => failed("payment_error"),
        }?;
        scaleshop_events::append(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(result)
    }

    /// The gateway's ledger entries for an order, oldest first (may be served by
    /// a read replica within `consistency`).
    pub async fn ledger(
        &self,
        order_id: Uuid,
        consistency: Consistency,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        const Q: &str = "SELECT id, order_id, amount_cents, currency, status, idempotency_key, created_at \
                         FROM payment_ledger WHERE order_id = $1 ORDER BY created_at, id";
        read_with!(self.db, consistency, pool => sqlx::query_as(Q).bind(order_id).fetch_all(pool).await?)
    }
}
