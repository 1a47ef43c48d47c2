//! The notification service. It reacts to events (`user.created` -> a `welcome`
//! notification; `order.processed` -> `order_confirmation`; `order.failed` ->
//! `order_failed`) by writing a notification record and an `email` job in one
//! transaction (the dispatcher's, which also writes the inbox row), so each cause
//! yields exactly one record whatever is redelivered. The job renders the message
//! with lettre and sends it: `.eml` files under the data folder by default, SMTP
//! when configured; the record goes `queued` -> `sent`, or `failed` when the job
//! dies.
//!
//! It never reads another service's tables: it keeps its own directory of
//! recipients from `user.created` / `user.updated`, and the rest comes in the events.

pub mod http;
pub mod mail;
pub mod store;

use std::sync::Arc;

use async_trait::async_trait;
use scaleshop_contracts::{OrderFailed, OrderProcessed, UserCreated, UserUpdated};
use scaleshop_db::{Database, Tx};
use scaleshop_events::{Consumer, Event, EventSet, HandlerError};
use scaleshop_jobs::{Job, JobError, JobHandler};
use serde::Deserialize;
use uuid::Uuid;

pub use mail::Mailer;
pub use store::{Notification, NotificationStore};

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

/// What a notification about an order's end needs.
struct OrderEnded {
    order_id: Uuid,
    user_id: Uuid,
    total_cents: i64,
    currency: String,
    /// `None` when the order was processed; why it failed otherwise.
    failure: Option<String>,
}

fn money(cents: i64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
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
                let draft = store::Draft {
                    user_id: user.user_id,
                    kind: "welcome",
                    to: user.email,
                    subject: "Welcome to scaleshop".to_owned(),
                    body: format!(
                        "Hello {},\n\nyour scaleshop account is ready. Sign in with this address to start shopping.\n\n-- scaleshop\n",
                        user.name
                    ),
                    order_id: None,
                    dedup_key: format!("welcome:{}", user.user_id),
                };
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
        let total = money(order.total_cents, &order.currency);
        let (kind, subject, body) = match order.failure.as_deref() {
            None => (
                "order_confirmation",
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
                    "order_failed",
                    format!("Your order {} could not be completed", order.order_id),
                    format!(
                        "Hello {name},\n\norder {} ({total}) could not be completed: {why}. Nothing was charged.\n\n-- scaleshop\n",
                        order.order_id
                    ),
                )
            }
        };
        let draft = store::Draft {
            user_id: order.user_id,
            kind,
            to: email,
            subject,
            body,
            order_id: Some(order.order_id),
            dedup_key: format!("order:{}", order.order_id),
        };
        store::create_with_email_job(tx, &draft).await?;
        Ok(())
    }
}

/// The `email` queue's handler.
#[derive(Debug, Clone)]
pub struct EmailJob {
    store: NotificationStore,
    mailer: Arc<Mailer>,
}

impl EmailJob {
    pub fn new(db: Database, mailer: Arc<Mailer>) -> Self {
        Self {
            store: NotificationStore::new(db),
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
        let id = payload(job)?.notification_id;
        let Some(notification) = self.store.get(id).await? else {
            return Err(JobError::permanent(format!(
                "notification {id} does not exist"
            )));
        };
        if notification.status == "sent" {
            return Ok(());
        }
        self.mailer.send(&notification).await?;
        self.store.mark_sent(&notification).await?;
        Ok(())
    }

    async fn on_dead(&self, job: &Job, tx: &mut Tx) -> Result<(), scaleshop_db::StoreError> {
        if let Ok(payload) = payload(job) {
            store::mark_failed(tx, payload.notification_id).await?;
        }
        Ok(())
    }
}

/// The tables this service owns.
pub fn migrations() -> scaleshop_db::Migrations {
    store::migrations()
}
