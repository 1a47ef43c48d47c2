//! Recovery: a process that knows it is alone takes running jobs back at once
//! (their interrupted run counted as one attempt, no more, no less); a run that
//! could not reach the database is not an attempt; and the runs that workers'
//! deaths cut short do not lengthen a failure's backoff.

use scaleshop_testkit::fixture;
use std::time::Duration;

use scaleshop_db::{sqlx, with_pool};
use scaleshop_jobs::worker::expire_all_leases;
use scaleshop_jobs::{NewJob, WorkerSettings};
use serde_json::json;

use crate::helpers::*;

const QUEUE: &str = "recovery_probe";

async fn interrupted(db: &scaleshop_db::Database, id: uuid::Uuid) -> i32 {
    const Q: &str = "SELECT interrupted FROM jobs WHERE id = $1";
    with_pool!(db, pool => sqlx::query_scalar(Q).bind(id).fetch_one(pool).await.expect("interrupted"))
}

scaleshop_testkit::both!(
    a_fresh_start_takes_running_jobs_back_at_once,
    |backend| async move {
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        let db = open(url.as_deref(), &dir).await;
        // A lease far longer than the test waits: only the take-back can free it.
        let settings = WorkerSettings {
            lease: Duration::from_secs(600),
            ..settings()
        };
        let job = enqueue(&db, NewJob::new(QUEUE, json!({ "n": 1 }))).await;

        let (crashing, hung) = start_hung_workers(
            &db,
            (url.clone(), dir.clone()),
            settings.clone(),
            (QUEUE, 1),
        )
        .await;
        eventually("the job running", async || hung.runs().await.len() == 1).await;
        crashing.crash();

        assert_eq!(expire_all_leases(&db).await.unwrap(), 1);
        let finisher = Probe::new(&db, "finisher").build();
        let running = start(&db, settings, &[(QUEUE, 1, finisher.clone())]);
        let done = wait_for_state(&db, job, "completed").await;
        running.stop().await;
        assert_eq!(done.attempts, 2, "the interrupted run counts once");
        assert_eq!(interrupted(&db, job).await, 1);
        assert_eq!(effects(&db, job).await, vec![("finisher".to_owned(), 2)]);
        // Nothing running: nothing to take back.
        assert_eq!(expire_all_leases(&db).await.unwrap(), 0);
    }
);

scaleshop_testkit::both!(
    an_unreachable_database_is_not_an_attempt,
    |backend| async move {
        let db = fresh(backend).await;
        // One attempt only: a counted failure would make it dead.
        let job = enqueue(
            &db,
            NewJob {
                max_attempts: Some(1),
                ..NewJob::new(QUEUE, json!({ "n": 2 }))
            },
        )
        .await;
        let probe = Probe::new(&db, "probe")
            .script(|_, prior| {
                if prior < 2 {
                    Plan::Unavailable("database unavailable".into())
                } else {
                    Plan::Succeed(Duration::ZERO)
                }
            })
            .build();
        let running = start(&db, settings(), &[(QUEUE, 1, probe.clone())]);
        let done = wait_for_state(&db, job, "completed").await;
        running.stop().await;
        assert_eq!(probe.runs_of(job).await.len(), 3);
        assert_eq!(done.attempts, 1);
        assert_eq!(effects(&db, job).await, vec![("probe".to_owned(), 1)]);
    }
);

scaleshop_testkit::both!(
    interrupted_runs_do_not_lengthen_the_backoff,
    |backend| async move {
        let db = fresh(backend).await;
        let job = enqueue(
            &db,
            NewJob {
                max_attempts: Some(10),
                ..NewJob::new(QUEUE, json!({ "n": 3 }))
            },
        )
        .await;
        // Three earlier runs died with their workers.
        with_pool!(db, pool => {
            sqlx::query("UPDATE jobs SET attempts = 3, interrupted = 3 WHERE id = $1")
                .bind(job).execute(pool).await.expect("set up");
        });
        let settings = WorkerSettings {
            min_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(600),
            ..settings()
        };
        let probe = Probe::new(&db, "probe")
            .script(|_, _| Plan::Retry("provider error".into()))
            .build();
        let running = start(&db, settings, &[(QUEUE, 1, probe.clone())]);
        let failed = wait_for_state(&db, job, "failed").await;
        running.stop().await;
        assert_eq!(failed.attempts, 4);
        // The job's first own failure: the first step of the backoff (10..=20 s), not
        // the fourth (80..=160 s).
        let delay = failed.run_at - failed.updated_at;
        assert!(
            delay >= chrono::Duration::seconds(9) && delay <= chrono::Duration::seconds(21),
            "retry scheduled {delay} after the failure"
        );
    }
);
