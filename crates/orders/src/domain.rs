//! Order domain types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "pending" => Self::Pending,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// Why an order failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    OutOfStock,
    PaymentDeclined,
    PaymentError,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfStock => "out_of_stock",
            Self::PaymentDeclined => "payment_declined",
            Self::PaymentError => "payment_error",
        }
    }
}

/// Where the saga of an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        match self {
            Self::Placed => "placed",
            Self::Reserved => "reserved",
            Self::Charging => "charging",
            Self::Done => "done",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "placed" => Self::Placed,
            "reserved" => Self::Reserved,
            "charging" => Self::Charging,
            "done" => Self::Done,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: Uuid,
    pub user_id: Uuid,
    pub status: Status,
    pub step: Step,
    pub items: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
    pub payment_method: String,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}
