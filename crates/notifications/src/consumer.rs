//! What the notification service registers: the `notifications` consumer (events
//! -> a record and its email job, in the delivery's transaction) and the `email`
//! queue's handler.

use std::sync::Arc;

use async_trait::async_trait;
use scaleshop_contracts::{OrderFailed, OrderProcessed, UserCreated, UserUpdated};
use scaleshop_db::{Database, Tx};
use scaleshop_events::{Consumer, Event, EventSet, HandlerError};
use scaleshop_jobs::{Job, JobError, JobHandler};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::{Draft, OrderEnded};
use crate::mail::Mailer;
use crate::service::Notifications;
use crate::store;

/// The queue that sends email.
pub const EMAIL_QUEUE: &str = "email";

/// The dispatcher consumer: events -> notification records + email jobs.
#[derive(Debug, Clone)]
pub struct NotificationConsumer;

scaleshop_contracts::event_set! {
    /// The events the notification service reacts to.
    #[derive(Debug)]
    enum Reaction {
        UserCreated(UserCreated),
        UserUpdated(UserUpdated),
        OrderProcessed(OrderProcessed),
        OrderFailed(OrderFailed),
    }
}

#[async_trait]
impl Consumer for NotificationConsumer {
    fn name(&self) -> &'static str {
        "notifications"
    }

    fn wants(&self, event_type: &str) -> bool {
        Reaction::wants(event_type)
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        let Some(reaction) = Reaction::decode(event)? else {
            return Ok(());
        };
        let order = match reaction {
            Reaction::UserCreated(user) => {
                store::upsert_recipient(tx, user.user_id, &user.email, &user.name).await?;
                let draft = Draft::welcome(user.user_id, user.email, &user.name);
                store::create_with_email_job(tx, &draft).await?;
                return Ok(());
            }
            Reaction::UserUpdated(user) => {
                store::upsert_recipient(tx, user.user_id, &user.email, &user.name).await?;
                return Ok(());
            }
            Reaction::OrderProcessed(order) => OrderEnded {
                order_id: order.order_id,
                user_id: order.user_id,
                total_cents: order.total_cents,
                currency: order.currency,
                failure: None,
            },
            Reaction::OrderFailed(order) => OrderEnded {
                order_id: order.order_id,
                user_id: order.user_id,
                total_cents: order.total_cents,
                currency: order.currency,
                failure: Some(order.reason),
            },
        };
        let Some((email, name)) = store::recipient(tx, order.user_id).await? else {
            return Err(HandlerError::new(format!(
                "no address known for user {}",
                order.user_id
            )));
        };
        store::create_with_email_job(tx, &Draft::order_ended(&order, email, &name)).await?;
        Ok(())
    }
}

/// The `email` queue's handler.
#[derive(Debug, Clone)]
pub struct EmailJob {
    notifications: Notifications,
    mailer: Arc<Mailer>,
}

impl EmailJob {
    pub fn new(db: Database, mailer: Arc<Mailer>) -> Self {
        Self {
            notifications: Notifications::new(db),
            mailer,
        }
    }
}

#[derive(Debug, Deserialize)]
struct EmailPayload {
    notification_id: Uuid,
}

fn payload(job: &Job) -> Result<EmailPayload, JobError> {
    serde_json::from_value(job.payload.0.clone())
        .map_err(|e| JobError::permanent(format!("bad email job payload: {e}")))
}

#[async_trait]
impl JobHandler for EmailJob {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        self.notifications
            .send(payload(job)?.notification_id, &self.mailer)
            .await
    }

    async fn on_dead(&self, job: &Job, tx: &mut Tx) -> Result<(), scaleshop_db::StoreError> {
        if let Ok(payload) = payload(job) {
            store::mark_failed(tx, payload.notification_id).await?;
        }
        Ok(())
    }
}
