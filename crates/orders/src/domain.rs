//! Order domain types: each holds only valid values; statuses, steps and
//! failure reasons are enums that read and write the text of the API and the
//! database. The currency and the payment method are the payment service's types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use scaleshop_payments::domain::{Currency, PaymentMethod};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub &'static str);

/// 1..=1000 units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(i64);

impl Quantity {
    pub fn parse(raw: i64) -> Result<Self, Invalid> {
        if (1..=1000).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(Invalid("must be from 1 to 1000"))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// A line as asked for, before prices are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WantedLine {
    pub product_id: Uuid,
    pub quantity: Quantity,
}

/// A line of an order, priced at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// Where an order is, as the API shows it.
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
pub enum Status {
    Pending,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Why an order failed.
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
pub enum FailureReason {
    OutOfStock,
    PaymentDeclined,
    PaymentError,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Where the saga of an order is (never shown; stored as text).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[strum(serialize_all = "snake_case")]
pub enum Step {
    /// Created; nothing reserved yet.
    Placed,
    /// Stock reserved; not charged yet (still cancellable).
    Reserved,
    /// The charge has been asked for (no longer cancellable).
    Charging,
    /// Completed, failed or cancelled.
    Done,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// An order as asked for.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub user_id: Uuid,
    pub lines: Vec<WantedLine>,
    pub payment_method: PaymentMethod,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: Status,
    pub step: Step,
    pub items: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: Currency,
    pub payment_method: PaymentMethod,
    pub failure_reason: Option<FailureReason>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;
    use std::str::FromStr;

    use strum::VariantArray;

    use super::*;

    /// Each value writes `text` and reads back from it (`FromStr`).
    fn round_trips<T>(values: &[T], texts: &[&str])
    where
        T: FromStr + std::fmt::Display + PartialEq + Debug,
        T::Err: Debug,
    {
        assert_eq!(values.len(), texts.len());
        for (value, text) in values.iter().zip(texts) {
            assert_eq!(value.to_string(), *text);
            assert_eq!(&text.parse::<T>().unwrap(), value);
        }
    }

    #[test]
    fn status_round_trips_in_text_and_json() {
        let texts = ["pending", "completed", "failed", "cancelled"];
        round_trips(Status::VARIANTS, &texts);
        for (status, text) in Status::VARIANTS.iter().zip(texts) {
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(text)
            );
            assert_eq!(
                serde_json::from_value::<Status>(serde_json::json!(text)).unwrap(),
                *status
            );
        }
        for bad in ["", "Pending", "done", "canceled"] {
            assert!(bad.parse::<Status>().is_err(), "{bad}");
            assert!(serde_json::from_value::<Status>(serde_json::json!(bad)).is_err());
        }
    }

    #[test]
    fn failure_reason_round_trips_in_text_and_json() {
        let texts = ["out_of_stock", "payment_declined", "payment_error"];
        round_trips(FailureReason::VARIANTS, &texts);
        for (reason, text) in FailureReason::VARIANTS.iter().zip(texts) {
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::json!(text)
            );
        }
        for bad in ["", "OutOfStock", "declined"] {
            assert!(bad.parse::<FailureReason>().is_err(), "{bad}");
        }
    }

    #[test]
    fn step_round_trips() {
        round_trips(Step::VARIANTS, &["placed", "reserved", "charging", "done"]);
        for bad in ["", "Placed", "pending"] {
            assert!(bad.parse::<Step>().is_err(), "{bad}");
        }
    }

    #[test]
    fn quantity_is_one_to_a_thousand() {
        assert_eq!(Quantity::parse(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::parse(1000).map(Quantity::get), Ok(1000));
        assert!(Quantity::parse(0).is_err() && Quantity::parse(1001).is_err());
    }
}
