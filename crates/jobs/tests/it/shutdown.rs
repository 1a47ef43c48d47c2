//! Shutdown lets running jobs finish.

use scaleshop_testkit::fixture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use scaleshop_jobs::NewJob;
use serde_json::json;

use crate::helpers::*;

const QUEUE: &str = "shutdown_probe";

scaleshop_testkit::both!(shutdown_waits_for_running_jobs, |backend| async move {
    let db = fresh(backend).await;
    let gate = Arc::new(AtomicBool::new(false));
    let probe = Probe::new(&db, "worker")
        .script({
            let gate = gate.clone();
            move |_, _| Plan::AfterGate(gate.clone(), Duration::from_millis(500))
        })
        .build();
    let running = start(&db, settings(), &[(QUEUE, 2, probe.clone())]);
    let id = enqueue(&db, NewJob::new(QUEUE, json!({}))).await;
    eventually("the job started", async || !probe.runs().await.is_empty()).await;

    // Shutdown while the job runs (it waits for the gate, then 500 ms more).
    running.signal();
    assert_eq!(probe.finished(), 0);
    gate.store(true, Ordering::SeqCst);
    running.join().await;
    assert_eq!(probe.finished(), 1, "shutdown waited for the job");
    let job = get(&db, id).await.unwrap();
    assert_eq!(job.state, "completed", "the job was allowed to finish");
    assert_eq!(job.attempts, 1);
    assert_eq!(effects(&db, id).await.len(), 1);
    assert_eq!(job_lease(&db, id).await, (None, None));

    // Stopped workers claim nothing more.
    let later = enqueue(&db, NewJob::new(QUEUE, json!({}))).await;
    tokio::time::sleep(settings().poll * 4).await;
    assert_eq!(get(&db, later).await.unwrap().state, "scheduled");
    assert_eq!(probe.runs().await.len(), 1);
});
