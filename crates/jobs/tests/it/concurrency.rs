//! A queue's concurrency bounds how many of its jobs run at once in a process.

use scaleshop_testkit::fixture;
use std::time::Duration;

use scaleshop_jobs::{JobQueue, NewJob};
use serde_json::json;

use crate::helpers::*;

const QUEUE: &str = "concurrency_probe";

scaleshop_testkit::both!(
    queue_runs_at_most_its_concurrency_at_once,
    |backend| async move {
        let db = fresh(backend).await;
        let mut ids = Vec::new();
        for n in 0..20 {
            ids.push(enqueue(&db, NewJob::new(QUEUE, json!({ "n": n }))).await);
        }
        let probe = Probe::new(&db, "worker")
            .script(|_, _| Plan::Succeed(Duration::from_millis(100)))
            .build();
        let running = start(&db, settings(), &[(QUEUE, 3, probe.clone())]);

        let queue = JobQueue::new(db.clone());
        eventually("20 completed jobs", async || {
            queue
                .list(Some(QUEUE), Some("completed"), None, 100)
                .await
                .unwrap()
                .len()
                == 20
        })
        .await;
        running.stop().await;

        let max = probe.max_running();
        assert!(max <= 3, "{max} jobs ran at once with a concurrency of 3");
        assert!(max >= 2, "the queue never ran two jobs at once (max {max})");
        assert_eq!(probe.runs().await.len(), 20, "each job ran once");
        for id in ids {
            let job = get(&db, id).await.unwrap();
            assert_eq!(job.state, "completed");
            assert_eq!(job.attempts, 1);
            assert_eq!(effects(&db, id).await.len(), 1);
        }
    }
);

scaleshop_testkit::both!(two_workers_never_run_a_job_twice, |backend| async move {
    let (url, dir) = scaleshop_testkit::fresh(backend).await;
    let db = open(url.as_deref(), &dir).await;
    let other = open(url.as_deref(), &dir).await;
    let one = Probe::new(&db, "one")
        .script(|_, _| Plan::Succeed(Duration::from_millis(10)))
        .build();
    let two = Probe::new(&other, "two")
        .script(|_, _| Plan::Succeed(Duration::from_millis(10)))
        .build();
    // Two owners (as two processes), both claiming from the same queue.
    let first = start(&db, settings(), &[(QUEUE, 3, one.clone())]);
    let second = start(&other, settings(), &[(QUEUE, 3, two.clone())]);
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(enqueue(&db, NewJob::new(QUEUE, json!({ "n": n }))).await);
    }
    let queue = JobQueue::new(db.clone());
    eventually("40 completed jobs", async || {
        queue
            .list(Some(QUEUE), Some("completed"), None, 100)
            .await
            .unwrap()
            .len()
            == 40
    })
    .await;
    first.stop().await;
    second.stop().await;

    assert_eq!(
        one.runs().await.len() + two.runs().await.len(),
        40,
        "each job ran once"
    );
    assert!(one.max_running() <= 3 && two.max_running() <= 3);
    for id in ids {
        assert_eq!(effects(&db, id).await.len(), 1, "effect of {id}");
        assert_eq!(get(&db, id).await.unwrap().attempts, 1);
    }
});
