//! The log's append lock never closes a cycle with row locks.
//!
//! On PostgreSQL an append holds the log's lock (an advisory lock) until commit.
//! A request transaction locks rows and appends last; a batch delivery runs
//! several handlers in one transaction. If a batch kept the log's lock after a
//! handler appended and a later handler of the same batch then waited for a row
//! that a request transaction holds, the request's append would wait for the
//! batch: a deadlock, one side aborted (an order answered 500, or a handler
//! retried). The dispatcher commits a batch right after a handler that appended,
//! so the later handler waits without holding the log's lock.
//!
//! The test builds exactly that interleaving: a request transaction holds a row,
//! a batch's first handler appends and its second one wants the row, then the
//! request appends. It must commit, and every handler must run once.

use scaleshop_testkit::fixture;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use scaleshop_db::{Backend as DbBackend, Tx, sqlx, with_pool, with_tx};
use scaleshop_events::{Consumer, Event, HandlerError, NewEvent};
use uuid::Uuid;

use crate::helpers::*;

const NAME: &str = "deadlock_probe";
const APPENDS: &str = "test.appends";
const TAKES_ROW: &str = "test.takes_row";

/// Appends an event for `test.appends`; adds 1 to the shared row for
/// `test.takes_row`. Counts its calls of each.
#[derive(Default)]
struct AppendsThenTakesRow {
    appends: AtomicUsize,
    takes_row: AtomicUsize,
}

#[async_trait]
impl Consumer for AppendsThenTakesRow {
    fn name(&self) -> &'static str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == APPENDS || event_type == TAKES_ROW
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        let failed = |e: scaleshop_db::StoreError| HandlerError::new(e.to_string());
        if event.kind == APPENDS {
            self.appends.fetch_add(1, Ordering::SeqCst);
            let next = NewEvent::raw("test.appended", 1, Uuid::now_v7(), serde_json::json!({}));
            scaleshop_events::append(tx, &next).await.map_err(failed)?;
        } else {
            self.takes_row.fetch_add(1, Ordering::SeqCst);
            with_tx!(tx, conn => {
                sqlx::query("UPDATE shared_row SET n = n + 1 WHERE id = 1")
                    .execute(conn)
                    .await
                    .map_err(|e| HandlerError::new(e.to_string()))?;
            });
        }
        Ok(())
    }
}

/// Sessions of this database waiting for a lock (PostgreSQL).
async fn lock_waiters(db: &scaleshop_db::Database) -> i64 {
    const Q: &str = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE NOT l.granted AND a.datname = current_database()";
    with_pool!(db, pool => sqlx::query_scalar(Q).fetch_one(pool).await.unwrap())
}

scaleshop_testkit::both!(
    a_batch_that_appended_never_waits_for_a_row_while_holding_the_log,
    |backend| async move {
        let db = fresh(backend).await;
        exec(
            &db,
            "CREATE TABLE shared_row (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
        )
        .await;
        exec(&db, "INSERT INTO shared_row (id, n) VALUES (1, 0)").await;
        let consumer = Arc::new(AppendsThenTakesRow::default());
        let running = start_consumers(&db, settings(), vec![consumer.clone()]).await;
        let postgres = db.backend() == DbBackend::Postgres;
        if !postgres {
            // SQLite has one writer at a time: the events go first, the request
            // then waits for (or runs before) the delivery; no cycle can form.
            append_in_one_tx(&db, &[APPENDS, TAKES_ROW]).await;
        }
        // The request transaction: it locks the row first, and appends last.
        let mut request = db.begin().await.unwrap();
        with_tx!(&mut request, conn => {
            sqlx::query("UPDATE shared_row SET n = n + 100 WHERE id = 1")
                .execute(conn)
                .await
                .unwrap();
        });
        if postgres {
            // One batch: the first handler appends, the second wants the row.
            append_in_one_tx(&db, &[APPENDS, TAKES_ROW]).await;
            // The delivery of `test.takes_row` waits for the request's row.
            eventually("a delivery waiting for the row", async || {
                lock_waiters(&db).await >= 1
            })
            .await;
        }

        let late = NewEvent::raw("test.request", 1, Uuid::now_v7(), serde_json::json!({}));
        // Well beyond PostgreSQL's deadlock_timeout (1 s): a cycle is found and
        // broken long before this.
        tokio::time::timeout(Duration::from_secs(10), async {
            scaleshop_events::append(&mut request, &late).await?;
            request.commit().await
        })
        .await
        .expect("the request's append does not hang")
        .expect("the request transaction commits: no deadlock aborted it");

        eventually("the row handler's effect", async || {
            let n: i64 = with_pool!(db, pool => {
                sqlx::query_scalar("SELECT CAST(n AS BIGINT) FROM shared_row WHERE id = 1")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            });
            n == 101
        })
        .await;
        eventually("the consumer at the head", async || {
            position(&db, NAME).await == head(&db).await
        })
        .await;
        running.stop().await;

        // No attempt was aborted and repeated: each handler ran once.
        assert_eq!(consumer.appends.load(Ordering::SeqCst), 1);
        assert_eq!(consumer.takes_row.load(Ordering::SeqCst), 1);
        const STATE: &str = "SELECT attempts, last_error FROM event_consumers WHERE name = $1";
        let state: (i32, Option<String>) = with_pool!(db, pool => {
            sqlx::query_as(STATE).bind(NAME).fetch_one(pool).await.unwrap()
        });
        assert_eq!(state, (0, None));
    }
);
