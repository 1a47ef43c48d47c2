//! Notification storage (one SQL text for both backends): records, read back
//! through the domain's parsed kind, channel and status; the recipients' address
//! book.

use chrono::{DateTime, Utc};
use scaleshop_contracts::NotificationSent;
use scaleshop_db::clock::now;
use scaleshop_db::sqlx::{self, FromRow};
use scaleshop_db::{
    Consistency, Database, Migrations, StoreError, Tx, read_with, with_pool, with_tx,
};
use scaleshop_events::NewEvent;
use scaleshop_jobs::NewJob;
use serde_json::json;
use uuid::Uuid;

use crate::consumer::EMAIL_QUEUE;
use crate::domain::{Channel, Draft, Notification, Status};

pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    Migrations {
        owner: "notifications",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

#[derive(Debug, FromRow)]
struct Row {
    id: Uuid,
    user_id: Uuid,
    kind: String,
    channel: String,
    to_addr: String,
    subject: String,
    body: String,
    status: String,
    order_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
}

impl TryFrom<Row> for Notification {
    type Error = StoreError;

    fn try_from(row: Row) -> Result<Self, StoreError> {
        let corrupt = |what: &str, raw: &str| {
            StoreError::Other(format!("notifications row {}: bad {what} {raw:?}", row.id))
        };
        Ok(Self {
            kind: row.kind.parse().map_err(|_| corrupt("kind", &row.kind))?,
            channel: row
                .channel
                .parse()
                .map_err(|_| corrupt("channel", &row.channel))?,
            status: row
                .status
                .parse()
                .map_err(|_| corrupt("status", &row.status))?,
            id: row.id,
            user_id: row.user_id,
            to: row.to_addr,
            subject: row.subject,
            body: row.body,
            order_id: row.order_id,
            created_at: row.created_at,
            sent_at: row.sent_at,
        })
    }
}

/// Writes the record and its email job in the caller's transaction. A second
/// draft with the same `dedup_key` changes nothing; returns whether it was new.
pub async fn create_with_email_job(tx: &mut Tx, draft: &Draft) -> Result<bool, StoreError> {
    const INSERT: &str = "INSERT INTO notifications (id, user_id, kind, channel, to_addr, subject, body, status, \
                          order_id, dedup_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                          ON CONFLICT (dedup_key) DO NOTHING";
    let id = Uuid::now_v7();
    let inserted = with_tx!(&mut *tx, conn => {
        sqlx::query(INSERT)
            .bind(id)
            .bind(draft.user_id)
            .bind(draft.kind.as_str())
            .bind(Channel::Email.as_str())
            .bind(&draft.to)
            .bind(&draft.subject)
            .bind(&draft.body)
            .bind(Status::Queued.as_str())
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
    const Q: &str = "UPDATE notifications SET status = $2 WHERE id = $1 AND status = $3";
    with_tx!(tx, conn => {
        sqlx::query(Q).bind(id).bind(Status::Failed.as_str()).bind(Status::Queued.as_str())
            .execute(conn).await?;
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
        let row: Option<Row> =
            with_pool!(self.db, pool => sqlx::query_as(Q).bind(id).fetch_optional(pool).await?);
        row.map(Notification::try_from).transpose()
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
        let rows: Vec<Row> = read_with!(self.db, consistency, pool => {
            sqlx::query_as(Q).bind(user_id).bind(before).bind(limit).fetch_all(pool).await?
        })?;
        rows.into_iter().map(Notification::try_from).collect()
    }

    /// `queued`/`failed` -> `sent`, with the `notification.sent` event, once.
    pub async fn mark_sent(&self, notification: &Notification) -> Result<(), StoreError> {
        const Q: &str =
            "UPDATE notifications SET status = $3, sent_at = $2 WHERE id = $1 AND status <> $3";
        let sent_at = now();
        let mut tx = self.db.begin().await?;
        let updated = with_tx!(&mut tx, conn => {
            sqlx::query(Q).bind(notification.id).bind(sent_at).bind(Status::Sent.as_str()).execute(conn).await?.rows_affected()
        });
        if updated == 1 {
            let event = NewEvent::typed(
                notification.id,
                &NotificationSent {
                    notification_id: notification.id,
                    user_id: notification.user_id,
                    kind: notification.kind.to_string(),
                    channel: notification.channel.to_string(),
                    order_id: notification.order_id,
                    sent_at,
                },
            )?;
            scaleshop_events::append(&mut tx, &event).await?;
        }
        tx.commit().await
    }
}
