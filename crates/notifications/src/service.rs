//! The notification service's use cases: list notifications, and send one (the
//! `email` job's work: once sent, a notification is never sent again by a re-run).

use std::sync::Arc;

use scaleshop_db::{Consistency, Database, StoreError};
use scaleshop_jobs::JobError;
use uuid::Uuid;

use crate::domain::{Notification, Status};
use crate::mail::Mailer;
use crate::store::NotificationStore;

/// The notification service's in-process API.
#[derive(Debug, Clone)]
pub struct Notifications {
    store: NotificationStore,
}

impl Notifications {
    pub fn new(db: Database) -> Self {
        Self {
            store: NotificationStore::new(db),
        }
    }

    /// Newest first; `user_id` `None` lists everyone's (admin). May be served by
    /// a read replica within `consistency`.
    pub async fn list(
        &self,
        user_id: Option<Uuid>,
        before: Option<Uuid>,
        limit: i64,
        consistency: Consistency,
    ) -> Result<Vec<Notification>, StoreError> {
        self.store.list(user_id, before, limit, consistency).await
    }

    /// Sends a notification through `mailer` unless it was sent already, then
    /// marks it `sent` (with `notification.sent`).
    pub async fn send(&self, id: Uuid, mailer: &Arc<Mailer>) -> Result<(), JobError> {
        let Some(notification) = self.store.get(id).await? else {
            return Err(JobError::permanent(format!(
                "notification {id} does not exist"
            )));
        };
        if notification.status == Status::Sent {
            return Ok(());
        }
        mailer.send(&notification).await?;
        self.store.mark_sent(&notification).await?;
        Ok(())
    }
}
