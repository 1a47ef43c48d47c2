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
//!
//! Layers: [`domain`] (kind, channel, status: parsed; the messages) <- [`service`]
//! (list, send) <- [`http`] (routes); [`consumer`] holds the event consumer and
//! the `email` job; [`mail`] renders and delivers with lettre. Only [`store`]
//! names sqlx and only `http` names axum.

pub mod consumer;
pub mod domain;
pub mod http;
pub mod mail;
pub mod service;
pub mod store;

pub use consumer::{EMAIL_QUEUE, EmailJob, NotificationConsumer};
pub use domain::Notification;
pub use mail::Mailer;
pub use service::Notifications;
pub use store::{NotificationStore, migrations};
