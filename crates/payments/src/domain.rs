//! Payment domain types, parsed at the edge and never held as bare strings:
//! [`Currency`], [`PaymentMethod`], what a charge came to ([`PaymentResult`]) and
//! a ledger entry's [`LedgerStatus`]. No I/O. Each type reads and writes the same
//! text on the wire, in the database and in `Display`/`FromStr`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a value was refused; safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub &'static str);

/// An ISO 4217 code: three upper-case letters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "EUR")]
pub struct Currency(String);

impl Currency {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Currency {
    type Err = Invalid;

    fn from_str(raw: &str) -> Result<Self, Invalid> {
        if raw.len() == 3 && raw.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Invalid("must be three upper-case letters (ISO 4217)"))
        }
    }
}

impl TryFrom<String> for Currency {
    type Error = Invalid;

    fn try_from(raw: String) -> Result<Self, Invalid> {
        raw.parse()
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> Self {
        currency.0
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A payment method the API takes: the sandbox's test tokens, named in the manner
/// of well-known providers.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
    utoipa::ToSchema,
)]
pub enum PaymentMethod {
    /// Succeeds.
    #[serde(rename = "pm_card_visa")]
    #[strum(serialize = "pm_card_visa")]
    CardVisa,
    /// Succeeds.
    #[serde(rename = "pm_card_mastercard")]
    #[strum(serialize = "pm_card_mastercard")]
    CardMastercard,
    /// Declined.
    #[serde(rename = "pm_card_chargeDeclined")]
    #[strum(serialize = "pm_card_chargeDeclined")]
    CardChargeDeclined,
    /// Fails as a provider error, every time.
    #[serde(rename = "pm_card_processingError")]
    #[strum(serialize = "pm_card_processingError")]
    CardProcessingError,
}

impl PaymentMethod {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What the charge of an order came to (the `payments` table's `status`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum PaymentResult {
    Succeeded,
    Declined,
    /// The provider kept failing; no more attempts.
    Error,
}

impl PaymentResult {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What one charge attempt that reached the gateway came to (a ledger entry).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum LedgerStatus {
    Succeeded,
    Declined,
    /// A provider error: nothing charged.
    Error,
}

impl LedgerStatus {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A final answer of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded,
    Declined,
}

/// A charge to make.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    pub idempotency_key: String,
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: Currency,
    pub method: PaymentMethod,
}

/// A ledger entry, as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LedgerEntry {
    pub id: Uuid,
    pub order_id: Uuid,
    pub amount_cents: i64,
    pub currency: Currency,
    pub status: LedgerStatus,
    pub idempotency_key: String,
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use strum::VariantArray;

    use super::*;

    /// Every value reads back from its text (`FromStr`, serde) and writes the same text.
    fn round_trips<T>(values: &[T], texts: &[&str])
    where
        T: FromStr
            + fmt::Display
            + Serialize
            + serde::de::DeserializeOwned
            + PartialEq
            + fmt::Debug,
        T::Err: fmt::Debug,
    {
        assert_eq!(values.len(), texts.len());
        for (value, text) in values.iter().zip(texts) {
            assert_eq!(value.to_string(), *text);
            assert_eq!(&text.parse::<T>().unwrap(), value);
            let json = serde_json::to_string(value).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), value);
        }
    }

    #[test]
    fn currency_takes_three_upper_case_letters() {
        for code in ["EUR", "USD", "JPY"] {
            let currency: Currency = code.parse().unwrap();
            assert_eq!(currency.as_str(), code);
            assert_eq!(currency.to_string(), code);
            let json = serde_json::to_string(&currency).unwrap();
            assert_eq!(serde_json::from_str::<Currency>(&json).unwrap(), currency);
        }
        for bad in ["eur", "EURO", "EU", "E1R", "", "ÉUR"] {
            assert!(bad.parse::<Currency>().is_err(), "{bad}");
            assert!(serde_json::from_value::<Currency>(serde_json::json!(bad)).is_err());
        }
    }

    #[test]
    fn payment_method_is_one_of_the_sandbox_tokens() {
        round_trips(
            PaymentMethod::VARIANTS,
            &[
                "pm_card_visa",
                "pm_card_mastercard",
                "pm_card_chargeDeclined",
                "pm_card_processingError",
            ],
        );
        for bad in [
            "",
            "visa",
            "pm_card_VISA",
            "pm_card_chargedeclined",
            "pm_card_amex",
        ] {
            assert!(bad.parse::<PaymentMethod>().is_err(), "{bad}");
            assert!(serde_json::from_value::<PaymentMethod>(serde_json::json!(bad)).is_err());
        }
    }

    #[test]
    fn statuses_round_trip_and_refuse_the_unknown() {
        round_trips(PaymentResult::VARIANTS, &["succeeded", "declined", "error"]);
        round_trips(LedgerStatus::VARIANTS, &["succeeded", "declined", "error"]);
        for bad in ["", "Succeeded", "pending", "transient"] {
            assert!(bad.parse::<PaymentResult>().is_err(), "{bad}");
            assert!(bad.parse::<LedgerStatus>().is_err(), "{bad}");
        }
    }
}
