//! Enqueue is transactional: a rolled-back enqueue leaves no job; a committed one
//! runs and completes.

use scaleshop_testkit::fixture;
use std::time::Duration;

use scaleshop_db::{sqlx, with_tx};
use scaleshop_jobs::{JobQueue, NewJob};
use serde_json::json;

use crate::helpers::*;

const QUEUE: &str = "enqueue_probe";

scaleshop_testkit::both!(
    enqueue_follows_the_callers_transaction,
    |backend| async move {
        const MARK: &str = "INSERT INTO marks (note) VALUES ($1)";
        const MARKS: &str = "SELECT COUNT(*) FROM marks";
        let db = fresh(backend).await;
        let queue = JobQueue::new(db.clone());

        // Rolled back: neither the caller's change nor the job exist.
        let mut tx = db.begin().await.unwrap();
        with_tx!(&mut tx, conn => {
            sqlx::query(MARK).bind("rolled back").execute(&mut *conn).await.unwrap();
        });
        let rolled_back = scaleshop_jobs::enqueue(&mut tx, &NewJob::new(QUEUE, json!({ "n": 1 })))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert!(queue.get(rolled_back).await.unwrap().is_none());

        // Committed: both exist; the job waits as `scheduled` until a worker runs it.
        let mut tx = db.begin().await.unwrap();
        with_tx!(&mut tx, conn => {
            sqlx::query(MARK).bind("committed").execute(&mut *conn).await.unwrap();
        });
        let committed = scaleshop_jobs::enqueue(&mut tx, &NewJob::new(QUEUE, json!({ "n": 2 })))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let marks: i64 = scaleshop_db::with_pool!(db, pool => {
            sqlx::query_scalar(MARKS).fetch_one(pool).await.unwrap()
        });
        assert_eq!(marks, 1);
        let job = queue.get(committed).await.unwrap().unwrap();
        assert_eq!(job.state, "scheduled");
        assert_eq!(job.attempts, 0);
        assert_eq!(job.max_attempts, 3);
        assert_eq!(job.queue, QUEUE);
        assert_eq!(job.payload.0, json!({ "n": 2 }));
        let listed = queue.list(Some(QUEUE), None, None, 10).await.unwrap();
        assert_eq!(
            listed.iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![committed]
        );

        let probe = Probe::new(&db, "worker")
            .script(|job, _| {
                if job.payload.0 == json!({ "n": 2 }) {
                    Plan::Succeed(Duration::ZERO)
                } else {
                    Plan::Permanent(format!("unexpected payload {}", job.payload.0))
                }
            })
            .build();
        let running = start(&db, settings(), &[(QUEUE, 1, probe.clone())]);
        let job = wait_for_state(&db, committed, "completed").await;
        running.stop().await;

        assert_eq!(job.attempts, 1);
        assert_eq!(job.last_error, None);
        assert_eq!(job_lease(&db, committed).await, (None, None));
        assert_eq!(
            effects(&db, committed).await,
            vec![("worker".to_owned(), 1)]
        );
        let runs = probe.runs().await;
        assert_eq!(runs.len(), 1, "only the committed job ran: {runs:?}");
        assert_eq!(runs[0].id, committed);
        assert!(queue.get(rolled_back).await.unwrap().is_none());
        assert_eq!(effect_count(&db).await, 1);
    }
);
