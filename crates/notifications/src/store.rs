//! Notification records.

use chrono::{DateTime, Utc};
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{
    Consistency, Database, Migrations, StoreError, Tx, read_with, with_pool, with_tx,
};
use scaleshop_events::NewEvent;
use scaleshop_jobs::NewJob;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::EMAIL_QUEUE;
use scaleshop_contracts::NotificationSent;

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "notifications",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// A notification, as the API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, FromRow, utoipa::ToSchema)]
pub struct Notification {
    pub id: Uuid,
    pub user_id: Uuid,
    /// `welcome`, `order_confirmation` or `order_failed`.
    pub kind: String,
    /// `email`.
    pub channel: String,
    #[serde(rename = "to")]
    #[sqlx(rename = "to_addr")]
    pub to: String,
    pub subject: String,
    #[serde(skip)]
    pub body: String,
    /// `queued`, `sent` or `failed`.
    pub status: String,
    pub order_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// A notification to create.
#[derive(Debug, Clone)]
pub struct Draft {
    pub user_id: Uuid,
    pub kind: &'static str,
    pub to: String,
    pub subject: String,
    pub body: String,
    pub order_id: Option<Uuid>,
    /// One record per key, ever.
    pub dedup_key: String,
}

/// Writes the record and its email job in the caller's transaction. A second
/// draft with the same `dedup_key` changes nothing; returns whether it was new.
pub async fn create_with_email_job(tx: &mut Tx, draft: &Draft) -> Result<bool, StoreError> {
    const INSERT: &str = "INSERT INTO notifications (id, user_id, kind, channel, to_addr, subject, body, status, \
                          order_id, dedup_key, created_at) VALUES ($1, $2, $3, 'email', $4, $5, $6, 'queued', $7, $8, $9) \
                          ON CONFLICT (dedup_key) DO NOTHING";
    let id = Uuid::now_v7();
    let inserted = with_tx!(&mut *tx, conn => {
        sqlx::query(INSERT)
            .bind(id)
            .bind(draft.user_id)
            .bind(draft.kind)
            .bind(&draft.to)
            .bind(&draft.subject)
            .bind(&draft.body)
            .bind(draft.order_id)
            .bind(&draft.dedup_key)
            .bind(now())
            .execute(conn)
            .await?
            .rows_affected()
    });
    if inserted == 1 {
        scaleshop_jobs::enqueue(
            tx,
            &NewJob::new(EMAIL_QUEUE, json!({"notification_id": id})),
        )
        .await?;
    }
    Ok(inserted == 1)
}

/// Keeps the address book current, in the caller's transaction.
pub async fn upsert_recipient(
    tx: &mut Tx,
    user_id: Uuid,
    email: &str,
    name: &str,
) -> Result<(), StoreError> {
    const Q: &str = "INSERT INTO recipients (user_id, email, name, updated_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, name = excluded.name, \
                     updated_at = excluded.updated_at";
    with_tx!(tx, conn => {
        sqlx::query(Q).bind(user_id).bind(email).bind(name).bind(now()).execute(conn).await?;
    });
    Ok(())
}

/// (email, name) of a user, read in the caller's transaction.
pub async fn recipient(tx: &mut Tx, user_id: Uuid) -> Result<Option<(String, String)>, StoreError> {
    const Q: &str = "SELECT email, name FROM recipients WHERE user_id = $1";
    Ok(with_tx!(tx, conn => sqlx::query_as(Q).bind(user_id).fetch_optional(conn).await?))
}

/// `queued` -> `failed`, in the transaction that kills the email job.
pub async fn mark_failed(tx: &mut Tx, id: Uuid) -> Result<(), StoreError> {
    const Q: &str =
        "UPDATE notifications SET status = 'failed' WHERE id = $1 AND status = 'queued'";
    with_tx!(tx, conn => {
        sqlx::query(Q).bind(id).execute(conn).await?;
    });
    Ok(())
}

const SELECT: &str = "SELECT id, user_id, kind, channel, to_addr, subject, body, status, order_id, created_at, sent_at \
                      FROM notifications";

#[derive(Debug, Clone)]
pub struct NotificationStore {
    db: Database,
}

impl NotificationStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Notification>, StoreError> {
        const Q: &str = "SELECT id, user_id, kind, channel, to_addr, subject, body, status, order_id, created_at, \
                         sent_at FROM notifications WHERE id = $1";
        debug_assert!(Q.starts_with(SELECT));
        Ok(with_pool!(self.db, pool => sqlx::query_as(Q).bind(id).fetch_optional(pool).await?))
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
        const Q: &str = "SELECT id, user_id, kind, channel, to_addr, subject, body, status, order_id, created_at, \
                         sent_at FROM notifications WHERE ($1 IS NULL OR user_id = $1) AND ($2 IS NULL OR id < $2) \
                         ORDER BY id DESC LIMIT $3";
        read_with!(self.db, consistency, pool => {
            sqlx::query_as(Q).bind(user_id).bind(before).bind(limit).fetch_all(pool).await?
        })
    }

    /// `queued`/`failed` -> `sent`, with the `notification.sent` event, once.
    pub async fn mark_sent(&self, notification: &Notification) -> Result<(), StoreError> {
        const Q: &str = "UPDATE notifications SET status = 'sent', sent_at = $2 WHERE id = $1 AND status <> 'sent'";
        let sent_at = now();
        let mut tx = self.db.begin().await?;
        let updated = with_tx!(&mut tx, conn => {
            sqlx::query(Q).bind(notification.id).bind(sent_at).execute(conn).await?.rows_affected()
        });
        if updated == 1 {
            let event = NewEvent::typed(
                notification.id,
                &NotificationSent {
                    notification_id: notification.id,
                    user_id: notification.user_id,
                    kind: notification.kind.clone(),
                    channel: notification.channel.clone(),
                    order_id: notification.order_id,
                    sent_at,
                },
            )?;
            scaleshop_events::append(&mut tx, &event).await?;
        }
        tx.commit().await
    }
}
