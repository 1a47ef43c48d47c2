//! Rendering and sending mail with lettre.
//!
//! Files: each message is written as `<notification id>.eml` under the mail folder
//! (atomically: a temporary file, then a rename), so a job that runs twice after a
//! crash rewrites the same file instead of leaving a second message. SMTP: lettre's
//! async transport, with a timeout on every connection.

use std::path::PathBuf;
use std::time::Duration;
use tracing::Instrument;

use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use scaleshop_jobs::JobError;

use crate::domain::Notification;

/// Where mail goes.
pub enum Mailer {
    Files {
        dir: PathBuf,
        from: Mailbox,
    },
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Files { dir, .. } => f.debug_struct("Mailer::Files").field("dir", dir).finish(),
            // The URL may hold credentials: never print it.
            Self::Smtp { .. } => f.write_str("Mailer::Smtp"),
        }
    }
}

/// A configuration that cannot make a mailer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MailerError(pub String);

impl Mailer {
    /// `.eml` files in `dir`.
    pub fn files(dir: PathBuf, from: &str) -> Result<Self, MailerError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| MailerError(format!("mail folder {}: {e}", dir.display())))?;
        Ok(Self::Files {
            dir,
            from: parse_from(from)?,
        })
    }

    /// SMTP at `url` (`smtp://[user:pass@]host:port`, `smtps://...`; lettre's URL
    /// forms), each exchange bounded by `timeout`.
    pub fn smtp(url: &str, from: &str, timeout: Duration) -> Result<Self, MailerError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| MailerError(format!("smtp_url: {e}")))?
            .timeout(Some(timeout))
            .build();
        Ok(Self::Smtp {
            transport,
            from: parse_from(from)?,
        })
    }

    fn render(&self, notification: &Notification) -> Result<Message, JobError> {
        let from = match self {
            Self::Files { from, .. } | Self::Smtp { from, .. } => from.clone(),
        };
        let to: Mailbox = notification
            .to
            .parse()
            .map_err(|e| JobError::permanent(format!("recipient address: {e}")))?;
        Message::builder()
            .from(from)
            .to(to)
            .subject(&notification.subject)
            .header(ContentType::TEXT_PLAIN)
            .body(notification.body.clone())
            .map_err(|e| JobError::permanent(format!("message: {e}")))
    }

    pub async fn send(&self, notification: &Notification) -> Result<(), JobError> {
        let message = self.render(notification)?;
        let transport = match self {
            Self::Files { .. } => "file",
            Self::Smtp { .. } => "smtp",
        };
        let span = tracing::info_span!(
            target: scaleshop_telemetry::trace::SPANS,
            "email",
            otel.name = format!("email send ({transport})"),
            otel.kind = "client",
            notification_id = %notification.id,
        );
        self.deliver(message, notification).instrument(span).await
    }

    async fn deliver(&self, message: Message, notification: &Notification) -> Result<(), JobError> {
        match self {
            Self::Files { dir, .. } => {
                let path = dir.join(format!("{}.eml", notification.id));
                let temporary = dir.join(format!(".{}.eml.tmp", notification.id));
                let bytes = message.formatted();
                tokio::fs::write(&temporary, &bytes)
                    .await
                    .map_err(|e| JobError::retry(format!("writing mail file: {e}")))?;
                tokio::fs::rename(&temporary, &path)
                    .await
                    .map_err(|e| JobError::retry(format!("writing mail file: {e}")))?;
                Ok(())
            }
            Self::Smtp { transport, .. } => {
                transport.send(message).await.map(|_| ()).map_err(|e| {
                    if e.is_permanent() {
                        JobError::permanent(format!("smtp: {e}"))
                    } else {
                        JobError::retry(format!("smtp: {e}"))
                    }
                })
            }
        }
    }
}

fn parse_from(from: &str) -> Result<Mailbox, MailerError> {
    from.parse()
        .map_err(|e| MailerError(format!("smtp_from {from:?}: {e}")))
}
