//! Events of the notification service.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract;

/// `notification.sent`: a notification left (aggregate: the notification).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationSent {
    pub notification_id: Uuid,
    pub user_id: Uuid,
    /// `welcome`, `order_confirmation` or `order_failed`.
    pub kind: String,
    /// `email`.
    pub channel: String,
    pub order_id: Option<Uuid>,
    pub sent_at: DateTime<Utc>,
}
contract!(NotificationSent, "notification.sent", 1);
