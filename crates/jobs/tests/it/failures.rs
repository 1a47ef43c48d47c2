//! Failures: retries with backoff, `dead` after the last attempt (with the
//! `on_dead` hook in the dead transaction), permanent errors, and redrive.

use scaleshop_testkit::fixture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use scaleshop_jobs::{JobQueue, NewJob, Redrive};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;

const QUEUE: &str = "failure_probe";

scaleshop_testkit::both!(
    failing_job_is_retried_then_completes,
    |backend| async move {
        let db = fresh(backend).await;
        let probe = Probe::new(&db, "worker")
            .script(|_, prior| {
                if prior < 2 {
                    Plan::Retry(format!("run {} fails", prior + 1))
                } else {
                    Plan::Succeed(Duration::ZERO)
                }
            })
            .build();
        let settings = settings();
        let running = start(&db, settings.clone(), &[(QUEUE, 1, probe.clone())]);
        let id = enqueue(&db, NewJob::new(QUEUE, json!({}))).await;
        let job = wait_for_state(&db, id, "completed").await;
        running.stop().await;

        assert_eq!(job.attempts, 3);
        assert_eq!(job.last_error, None, "completion clears the last error");
        assert_eq!(effects(&db, id).await, vec![("worker".to_owned(), 3)]);
        assert!(dead_notes(&db, id).await.is_empty());
        let runs = probe.runs_of(id).await;
        assert_eq!(
            runs.iter().map(|r| r.attempts).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "each run counts as an attempt"
        );
        // Run times and retry times come from the same clock; the queue stores
        // microseconds, hence the 1 ms of slack.
        for pair in runs.windows(2) {
            let gap = (pair[1].started - pair[0].started)
                .to_std()
                .unwrap_or_default();
            assert!(
                gap + Duration::from_millis(1) >= settings.min_backoff,
                "retried after {gap:?}, before the minimum backoff {:?}",
                settings.min_backoff
            );
        }
    }
);

scaleshop_testkit::both!(
    job_failing_every_attempt_is_dead_then_redriven,
    |backend| async move {
        let db = fresh(backend).await;
        let fixed = Arc::new(AtomicBool::new(false));
        let probe = Probe::new(&db, "worker")
            .script({
                let fixed = fixed.clone();
                move |_, prior| {
                    if fixed.load(Ordering::SeqCst) {
                        Plan::Succeed(Duration::ZERO)
                    } else {
                        Plan::Retry(format!("run {} fails", prior + 1))
                    }
                }
            })
            .build();
        let running = start(&db, settings(), &[(QUEUE, 1, probe.clone())]);
        let id = enqueue(&db, NewJob::new(QUEUE, json!({}))).await;
        let job = wait_for_state(&db, id, "dead").await;
        running.stop().await;

        assert_eq!(job.attempts, 3);
        assert_eq!(job.max_attempts, 3);
        assert_eq!(job.last_error.as_deref(), Some("run 3 fails"));
        assert_eq!(probe.runs_of(id).await.len(), 3);
        assert!(effects(&db, id).await.is_empty());
        assert_eq!(job_lease(&db, id).await, (None, None));
        // on_dead ran in the transaction that made it dead: it saw it dead.
        assert_eq!(
            dead_notes(&db, id).await,
            vec![("dead".to_owned(), "run 3 fails".to_owned(), 3)]
        );

        // Redrive (workers stopped, so the state it reports is not raced).
        let queue = JobQueue::new(db.clone());
        match queue.retry(id).await.unwrap() {
            Redrive::Scheduled(job) => {
                assert_eq!(job.state, "scheduled");
                assert_eq!(job.attempts, 0, "a fresh set of attempts");
            }
            other => panic!("expected Scheduled, got {other:?}"),
        }
        let job = get(&db, id).await.unwrap();
        assert_eq!((job.state.as_str(), job.attempts), ("scheduled", 0));
        assert_eq!(job_lease(&db, id).await, (None, None));

        fixed.store(true, Ordering::SeqCst);
        let running = start(&db, settings(), &[(QUEUE, 1, probe.clone())]);
        let job = wait_for_state(&db, id, "completed").await;
        running.stop().await;
        assert_eq!(job.attempts, 1);
        assert_eq!(effects(&db, id).await, vec![("worker".to_owned(), 1)]);
        assert_eq!(dead_notes(&db, id).await.len(), 1);

        match queue.retry(id).await.unwrap() {
            Redrive::NotRetryable(job) => assert_eq!(job.state, "completed"),
            other => panic!("expected NotRetryable, got {other:?}"),
        }
        assert_eq!(get(&db, id).await.unwrap().state, "completed");
        assert!(matches!(
            queue.retry(Uuid::now_v7()).await.unwrap(),
            Redrive::Missing
        ));
    }
);

scaleshop_testkit::both!(
    permanent_error_is_dead_after_one_attempt,
    |backend| async move {
        let db = fresh(backend).await;
        let probe = Probe::new(&db, "worker")
            .script(|_, _| Plan::Permanent("malformed payload".into()))
            .build();
        let running = start(&db, settings(), &[(QUEUE, 1, probe.clone())]);
        let id = enqueue(
            &db,
            NewJob {
                max_attempts: Some(5),
                ..NewJob::new(QUEUE, json!({}))
            },
        )
        .await;
        let job = wait_for_state(&db, id, "dead").await;
        // A few more polls: it stays dead and never runs again.
        tokio::time::sleep(settings().poll * 4).await;
        running.stop().await;

        let job_now = get(&db, id).await.unwrap();
        assert_eq!(job_now.state, "dead");
        assert_eq!(job.attempts, 1);
        assert_eq!(job_now.attempts, 1);
        assert_eq!(job.last_error.as_deref(), Some("malformed payload"));
        assert_eq!(probe.runs_of(id).await.len(), 1);
        assert_eq!(
            dead_notes(&db, id).await,
            vec![("dead".to_owned(), "malformed payload".to_owned(), 1)]
        );
    }
);

scaleshop_testkit::both!(
    failing_on_dead_rolls_back_the_dead_transaction,
    |backend| async move {
        let db = fresh(backend).await;
        let probe = Probe::new(&db, "worker")
            .script(|_, _| Plan::Permanent("malformed payload".into()))
            .fail_on_dead_once()
            .build();
        let running = start(&db, settings(), &[(QUEUE, 1, probe.clone())]);
        let id = enqueue(&db, NewJob::new(QUEUE, json!({}))).await;
        // The first dead transaction fails in on_dead: neither the note nor the
        // `dead` state are kept; the job runs again once its lease expires.
        let job = wait_for_state(&db, id, "dead").await;
        running.stop().await;

        assert_eq!(probe.runs_of(id).await.len(), 2);
        assert_eq!(job.attempts, 2);
        assert_eq!(
            dead_notes(&db, id).await,
            vec![("dead".to_owned(), "malformed payload".to_owned(), 2)],
            "the note of the rolled-back dead transaction is gone"
        );
    }
);

scaleshop_testkit::both!(
    panicking_handler_fails_the_run_not_the_worker,
    |backend| async move {
        let db = fresh(backend).await;
        let probe = Probe::new(&db, "worker")
            .script(|_, prior| {
                if prior == 0 {
                    Plan::Panic
                } else {
                    Plan::Succeed(Duration::ZERO)
                }
            })
            .build();
        let running = start(&db, settings(), &[(QUEUE, 1, probe.clone())]);
        let first = enqueue(&db, NewJob::new(QUEUE, json!({ "n": 1 }))).await;
        let job = wait_for_state(&db, first, "completed").await;
        assert_eq!(
            job.attempts, 2,
            "the panicking run counts as a failed attempt"
        );
        // The worker goes on with other jobs.
        let second = enqueue(&db, NewJob::new(QUEUE, json!({ "n": 2 }))).await;
        wait_for_state(&db, second, "completed").await;
        running.stop().await;
        assert_eq!(effects(&db, first).await, vec![("worker".to_owned(), 2)]);
    }
);
