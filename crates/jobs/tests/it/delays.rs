//! A delayed job never runs before its `run_at`, and runs after it.

use scaleshop_testkit::fixture;
use std::time::Duration;

use chrono::Utc;
use scaleshop_db::clock;
use scaleshop_jobs::NewJob;
use serde_json::json;

use crate::helpers::*;

const QUEUE: &str = "delay_probe";

scaleshop_testkit::both!(delayed_job_waits_for_run_at, |backend| async move {
    let db = fresh(backend).await;
    let probe = Probe::new(&db, "worker").build();
    let running = start(&db, settings(), &[(QUEUE, 2, probe.clone())]);

    let run_at = clock::after(Duration::from_millis(1500));
    let delayed = enqueue(
        &db,
        NewJob {
            run_at: Some(run_at),
            ..NewJob::new(QUEUE, json!({ "delayed": true }))
        },
    )
    .await;
    let now = enqueue(&db, NewJob::new(QUEUE, json!({ "delayed": false }))).await;
    assert_eq!(get(&db, delayed).await.unwrap().run_at, run_at);

    // The immediate one runs; the delayed one is still waiting if its time has
    // not come.
    wait_for_state(&db, now, "completed").await;
    let job = get(&db, delayed).await.unwrap();
    if Utc::now() < run_at {
        assert_eq!(job.state, "scheduled", "ran before its run_at");
        assert!(probe.runs_of(delayed).await.is_empty());
    }

    let job = wait_for_state(&db, delayed, "completed").await;
    running.stop().await;
    let runs = probe.runs_of(delayed).await;
    assert_eq!(runs.len(), 1);
    assert!(
        runs[0].started >= run_at,
        "started at {}, before its run_at {run_at}",
        runs[0].started
    );
    assert_eq!(job.attempts, 1);
    assert_eq!(effects(&db, delayed).await.len(), 1);
});
