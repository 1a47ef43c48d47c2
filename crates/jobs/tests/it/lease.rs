//! Leases: a live worker keeps renewing the lease of a long job, so no other
//! worker takes it; when a worker crashes its jobs run again elsewhere once the
//! lease expires, and a job whose workers kept dying goes `dead`.
//!
//! The crash: the first workers run on a runtime of their own (with their own
//! database handle, as another process would) that is shut down in the background,
//! which drops their tasks mid-flight: no outcome is recorded and renewals stop.

use scaleshop_jobs::NewJob;
use scaleshop_testkit::fixture;
use serde_json::json;

use crate::helpers::*;

const QUEUE: &str = "lease_probe";

scaleshop_testkit::both!(
    crashed_workers_jobs_run_again_after_the_lease,
    |backend| async move {
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        let db = open(url.as_deref(), &dir).await;
        let settings = settings();
        let job = enqueue(&db, NewJob::new(QUEUE, json!({ "n": 1 }))).await;
        // Its workers keep dying: at most one attempt.
        let fragile = enqueue(
            &db,
            NewJob {
                max_attempts: Some(1),
                ..NewJob::new(QUEUE, json!({ "n": 2 }))
            },
        )
        .await;

        // First workers: the handler never returns.
        let (crashing, hung) = start_hung_workers(
            &db,
            (url.clone(), dir.clone()),
            settings.clone(),
            (QUEUE, 2),
        )
        .await;
        eventually("both jobs running", async || hung.runs().await.len() == 2).await;
        let (first_owner, _) = job_lease(&db, job).await;
        let first_owner = first_owner.expect("a lease owner");

        // Second workers, while the first are alive: the lease is renewed, so they do
        // not take the jobs, even after several lease periods.
        let finisher = Probe::new(&db, "finisher").build();
        let running = start(&db, settings.clone(), &[(QUEUE, 2, finisher.clone())]);
        tokio::time::sleep(settings.lease * 5 / 2).await;
        assert!(
            finisher.runs().await.is_empty(),
            "a job was taken from a live worker"
        );
        for id in [job, fragile] {
            let current = get(&db, id).await.unwrap();
            assert_eq!((current.state.as_str(), current.attempts), ("running", 1));
            assert_eq!(
                job_lease(&db, id).await.0.as_deref(),
                Some(first_owner.as_str())
            );
        }

        // Crash the first workers.
        let until = job_lease(&db, job).await.1.expect("lease time");
        crashing.crash();

        let done = wait_for_state(&db, job, "completed").await;
        let dead = wait_for_state(&db, fragile, "dead").await;
        running.stop().await;

        assert_eq!(done.attempts, 2, "the crashed attempt counts");
        assert_eq!(effects(&db, job).await, vec![("finisher".to_owned(), 2)]);
        let runs = finisher.runs_of(job).await;
        assert_eq!(runs.len(), 1);
        assert!(
            runs[0].started >= until,
            "taken at {} before the lease ran out at {until}",
            runs[0].started
        );
        assert_eq!(job_lease(&db, job).await, (None, None));

        // The fragile job had no attempt left: dead without running again.
        assert!(finisher.runs_of(fragile).await.is_empty());
        assert_eq!(dead.attempts, 2);
        let error = dead.last_error.clone().unwrap_or_default();
        assert!(error.contains("no attempts left"), "{error}");
        assert_eq!(
            dead_notes(&db, fragile).await,
            vec![("dead".to_owned(), error, 2)]
        );
        assert_eq!(hung.runs().await.len(), 2);
    }
);
