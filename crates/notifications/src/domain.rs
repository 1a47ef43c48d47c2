//! Notification domain types: what a notification is about ([`Kind`]), how it
//! travels ([`Channel`]) and where it is ([`Status`]), each an enum that reads and
//! writes the text of the API and the database; the record itself; and the
//! messages, composed from what the events carry. No I/O.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a notification is about.
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
pub enum Kind {
    Welcome,
    OrderConfirmation,
    OrderFailed,
}

/// How a notification is sent.
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
pub enum Channel {
    Email,
}

/// Where a notification is: `queued` until its email job sends it (`sent`), or
/// `failed` when the job ran out of attempts.
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
#[schema(as = NotificationStatus)]
pub enum Status {
    Queued,
    Sent,
    Failed,
}

macro_rules! as_str {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    )*};
}
as_str!(Kind, Channel, Status);

/// A notification, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Notification {
    pub id: Uuid,
    pub user_id: Uuid,
    pub kind: Kind,
    pub channel: Channel,
    #[serde(rename = "to")]
    pub to: String,
    pub subject: String,
    #[serde(skip)]
    pub body: String,
    pub status: Status,
    pub order_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// A notification to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub user_id: Uuid,
    pub kind: Kind,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub order_id: Option<Uuid>,
    /// One record per key, ever.
    pub dedup_key: String,
}

impl Draft {
    /// The welcome of a new account (one per user, ever).
    pub fn welcome(user_id: Uuid, email: String, name: &str) -> Self {
        Self {
            user_id,
            kind: Kind::Welcome,
            to: email,
            subject: "Welcome to scaleshop".to_owned(),
            body: format!(
                "Hello {name},\n\nyour scaleshop account is ready. Sign in with this address to start shopping.\n\n-- scaleshop\n"
            ),
            order_id: None,
            dedup_key: format!("welcome:{user_id}"),
        }
    }

    /// The message at an order's end (one per order, ever).
    pub fn order_ended(order: &OrderEnded, email: String, name: &str) -> Self {
        let total = money(order.total_cents, &order.currency);
        let (kind, subject, body) = match order.failure.as_deref() {
            None => (
                Kind::OrderConfirmation,
                format!("Your order {} is confirmed", order.order_id),
                format!(
                    "Hello {name},\n\nthank you: order {} ({total}) is paid and on its way.\n\n-- scaleshop\n",
                    order.order_id
                ),
            ),
            Some(reason) => {
                let why = match reason {
                    "out_of_stock" => "an item is out of stock",
                    "payment_declined" => "the payment was declined",
                    _ => "the payment could not be processed",
                };
                (
                    Kind::OrderFailed,
                    format!("Your order {} could not be completed", order.order_id),
                    format!(
                        "Hello {name},\n\norder {} ({total}) could not be completed: {why}. Nothing was charged.\n\n-- scaleshop\n",
                        order.order_id
                    ),
                )
            }
        };
        Self {
            user_id: order.user_id,
            kind,
            to: email,
            subject,
            body,
            order_id: Some(order.order_id),
            dedup_key: format!("order:{}", order.order_id),
        }
    }
}

/// What a notification about an order's end needs (from `order.processed` or
/// `order.failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderEnded {
    pub order_id: Uuid,
    pub user_id: Uuid,
    pub total_cents: i64,
    /// The event's currency code, shown as is.
    pub currency: String,
    /// `None` when the order was processed; why it failed otherwise (the event's
    /// reason: `out_of_stock`, `payment_declined`, `payment_error`).
    pub failure: Option<String>,
}

fn money(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;
    use std::str::FromStr;

    use serde::de::DeserializeOwned;
    use strum::VariantArray;

    use super::*;

    /// Each value writes `text` (Display, JSON) and reads back from it; anything
    /// else is refused.
    fn round_trips<T>(texts: &[&str], refused: &[&str])
    where
        T: VariantArray
            + FromStr
            + std::fmt::Display
            + Serialize
            + DeserializeOwned
            + PartialEq
            + Debug,
        T::Err: Debug,
    {
        assert_eq!(T::VARIANTS.len(), texts.len());
        for (value, text) in T::VARIANTS.iter().zip(texts) {
            assert_eq!(value.to_string(), *text);
            assert_eq!(&text.parse::<T>().unwrap(), value);
            assert_eq!(
                serde_json::to_value(value).unwrap(),
                serde_json::json!(text)
            );
            assert_eq!(
                &serde_json::from_value::<T>(serde_json::json!(text)).unwrap(),
                value
            );
        }
        for bad in refused {
            assert!(bad.parse::<T>().is_err(), "{bad}");
            assert!(
                serde_json::from_value::<T>(serde_json::json!(bad)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn kind_channel_and_status_round_trip() {
        round_trips::<Kind>(
            &["welcome", "order_confirmation", "order_failed"],
            &["", "Welcome", "order_cancelled"],
        );
        round_trips::<Channel>(&["email"], &["", "sms", "Email"]);
        round_trips::<Status>(
            &["queued", "sent", "failed"],
            &["", "Sent", "pending", "dead"],
        );
    }

    #[test]
    fn order_messages_name_the_cause_and_the_total() {
        let order = OrderEnded {
            order_id: Uuid::from_u128(7),
            user_id: Uuid::from_u128(1),
            total_cents: 12_345,
            currency: "EUR".to_owned(),
            failure: None,
        };
        let done = Draft::order_ended(&order, "a@example.com".to_owned(), "Ann");
        assert_eq!(done.kind, Kind::OrderConfirmation);
        assert!(done.body.contains("(123.45 EUR) is paid"), "{}", done.body);
        assert_eq!(done.dedup_key, format!("order:{}", order.order_id));
        let failed = OrderEnded {
            failure: Some("payment_declined".to_owned()),
            ..order
        };
        let failed = Draft::order_ended(&failed, "a@example.com".to_owned(), "Ann");
        assert_eq!(failed.kind, Kind::OrderFailed);
        assert!(
            failed.body.contains("the payment was declined"),
            "{}",
            failed.body
        );
    }
}
