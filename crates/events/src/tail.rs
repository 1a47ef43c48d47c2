//! A follower of the log for in-memory reactions (dropping cache entries): it
//! starts at the head, sees every event committed afterwards (woken on commit,
//! with a poll as the safety net), and keeps no state in the database. Not a
//! consumer: it has no inbox, no lease, no retries — what it drives must be
//! rebuildable (a cache is: a process that restarts starts empty).

use std::time::Duration;

use scaleshop_db::{Database, Topic};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{Event, EventLog};

/// Calls `on_event` for every event committed after the start, in order, until
/// `shutdown` turns true.
pub fn spawn_tail(
    db: Database,
    poll: Duration,
    on_event: impl Fn(&Event) + Send + Sync + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let log = EventLog::new(db.clone());
        let signal = db.commit_signal(Topic::Events);
        let mut position = None;
        while !*shutdown.borrow() {
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut wait = poll;
            match position {
                None => match log.head().await {
                    Ok(head) => {
                        position = Some(head);
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "event tail cannot read the head yet");
                        wait = Duration::from_secs(1);
                    }
                },
                Some(after) => match log.list(after, 500).await {
                    Ok(events) if !events.is_empty() => {
                        for event in &events {
                            on_event(event);
                        }
                        position = events.last().map(|e| e.sequence);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "event tail read failed");
                        wait = Duration::from_secs(1);
                    }
                },
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    })
}
