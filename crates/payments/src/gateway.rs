//! The payment provider: the [`PaymentGateway`] port and the built-in
//! [`SandboxGateway`], which takes the test tokens of [`PaymentMethod`] and keeps a
//! ledger of every charge attempt that reached it (so a double charge would be
//! visible). The gateway de-duplicates by idempotency key: a second charge with the
//! same key returns the first final answer and charges nothing.

use std::sync::Arc;

use async_trait::async_trait;
use scaleshop_db::{Database, StoreError};

use crate::domain::{ChargeOutcome, ChargeRequest, LedgerStatus, PaymentMethod};
use crate::faults::LostAnswers;
use crate::store;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Worth retrying (the provider failed and charged nothing).
    #[error("provider error: {0}")]
    Transient(String),
    /// The answer was lost (a timeout): the charge may have been made. Ask again
    /// with the same idempotency key to learn its outcome.
    #[error("no answer from the provider: {0}")]
    Unknown(String),
    /// Never worth retrying (a payment method this gateway does not take).
    #[error("invalid charge: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A payment provider.
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    /// Whether `method` is a payment method this gateway takes.
    fn accepts(&self, method: PaymentMethod) -> bool;
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, GatewayError>;
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
}

#[async_trait]
impl PaymentGateway for SandboxGateway {
    fn accepts(&self, _method: PaymentMethod) -> bool {
        // Every method of the API is a sandbox token.
        true
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, GatewayError> {
        if let Some(answer) = store::final_answer(&self.db, &request.idempotency_key).await? {
            return Ok(answer);
        }
        let (status, outcome) = match request.method {
            PaymentMethod::CardVisa | PaymentMethod::CardMastercard => {
                (LedgerStatus::Succeeded, ChargeOutcome::Succeeded)
            }
            PaymentMethod::CardChargeDeclined => (LedgerStatus::Declined, ChargeOutcome::Declined),
            PaymentMethod::CardProcessingError => {
                store::record_attempt(&self.db, request, LedgerStatus::Error).await?;
                return Err(GatewayError::Transient("processing error".into()));
            }
        };
        match store::record_attempt(&self.db, request, status).await {
            Ok(()) if self.lost_answers.lose_next() => Err(GatewayError::Unknown(format!(
                "the answer to charge {:?} was lost (sandbox fault mode)",
                request.idempotency_key
            ))),
            Ok(()) => Ok(outcome),
            // A concurrent charge with the same key answered first: its answer stands.
            Err(StoreError::Conflict(_)) => store::final_answer(&self.db, &request.idempotency_key)
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
