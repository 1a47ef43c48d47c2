//! The commit signal: with a poll far longer than the bounded wait, a committed
//! append still reaches the consumer, so it was the commit that woke the
//! dispatcher. A correctness check of the signal, not a benchmark.

use scaleshop_testkit::fixture;
use std::time::Duration;

use scaleshop_db::sqlx;
use scaleshop_events::DispatcherSettings;
use scaleshop_testkit::Backend;
use tokio::sync::watch;

use crate::helpers::*;

/// Far longer than [`PROMPT`]: a delivery within `PROMPT` was not the poll's.
const POLL: Duration = Duration::from_secs(60);
const PROMPT: Duration = Duration::from_secs(10);

fn slow_poll() -> DispatcherSettings {
    DispatcherSettings {
        poll: POLL,
        ..settings()
    }
}

scaleshop_testkit::both!(commit_wakes_the_dispatcher, |backend| async move {
    const NAME: &str = "wake_probe";
    let db = fresh(backend).await;
    let consumer = Recorder::new(NAME).build();
    let running = start(&db, slow_poll(), std::slice::from_ref(&consumer)).await;
    for round in 1..=3_i64 {
        // Let the dispatcher go back to sleep first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (id, _) = append_one(&db, "test.wake").await;
        eventually_within(PROMPT, &format!("delivery {round} on commit"), async || {
            effects_of_event(&db, NAME, id).await == 1
        })
        .await;
    }
    // A rolled-back append wakes nobody and delivers nothing.
    let mut tx = db.begin().await.unwrap();
    let event = scaleshop_events::NewEvent::raw(
        "test.rolled_back",
        1,
        uuid::Uuid::now_v7(),
        serde_json::json!({}),
    );
    scaleshop_events::append(&mut tx, &event).await.unwrap();
    tx.rollback().await.unwrap();
    let (id, _) = append_one(&db, "test.wake").await;
    eventually_within(PROMPT, "delivery after a rollback", async || {
        effects_of_event(&db, NAME, id).await == 1
    })
    .await;
    running.stop().await;
    assert_eq!(effect_count(&db, NAME).await, 4);
    assert_eq!(effects_of_event(&db, NAME, event.id).await, 0);

    if backend == Backend::Postgres {
        commit_in_another_process_wakes_through_listen().await;
    }
});

/// On PostgreSQL a commit made through another database handle (another process)
/// reaches a dispatcher through `LISTEN` ([`scaleshop_db::Database::spawn_commit_listener`]).
async fn commit_in_another_process_wakes_through_listen() {
    const NAME: &str = "wake_remote_probe";
    let (url, dir) = scaleshop_testkit::fresh(Backend::Postgres).await;
    let writer = open(url.as_deref(), &dir).await;
    let reader = open(url.as_deref(), &dir).await;
    let (stop, shutdown) = watch::channel(false);
    let listener = reader
        .spawn_commit_listener(shutdown)
        .expect("a listener on PostgreSQL");
    const LISTENING: &str = "SELECT COUNT(*) FROM pg_stat_activity \
                             WHERE datname = current_database() AND query LIKE 'LISTEN %'";
    eventually("the LISTEN connection", async || {
        let n: i64 = scaleshop_db::with_pool!(writer, pool => {
            sqlx::query_scalar(LISTENING).fetch_one(pool).await.unwrap()
        });
        n == 1
    })
    .await;

    let consumer = Recorder::new(NAME).build();
    let running = start(&reader, slow_poll(), std::slice::from_ref(&consumer)).await;
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (id, _) = append_one(&writer, "test.wake").await;
        eventually_within(
            PROMPT,
            &format!("delivery {round} of another process's commit"),
            async || effects_of_event(&reader, NAME, id).await == 1,
        )
        .await;
    }
    running.stop().await;
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, listener)
        .await
        .expect("listener stops")
        .unwrap();
}

/// Whether `signal` fires within `within`, having been armed before `act` ran.
async fn fires(signal: &tokio::sync::Notify, within: Duration, act: impl AsyncFnOnce()) -> bool {
    let notified = signal.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    act().await;
    tokio::time::timeout(within, notified).await.is_ok()
}

/// Long enough for a notification to come back from the server; a wake-up
/// that should not happen and came later would go unseen, never fail the test.
const QUIET: Duration = Duration::from_secs(1);

scaleshop_testkit::both!(
    a_commit_wakes_the_waiters_of_its_topic_only,
    |backend| async move {
        use scaleshop_db::Topic;
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        let here = open(url.as_deref(), &dir).await;
        // On PostgreSQL, another process: it hears `here`'s commits through LISTEN.
        let there = open(url.as_deref(), &dir).await;
        let (stop, shutdown) = watch::channel(false);
        let listener = there.spawn_commit_listener(shutdown);
        if listener.is_some() {
            // The listener wakes everyone once it listens: let that pass.
            eventually("the LISTEN connection", async || {
                let n: i64 = scaleshop_db::with_pool!(here, pool => {
                    sqlx::query_scalar(
                        "SELECT COUNT(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
                    )
                    .fetch_one(pool)
                    .await
                    .unwrap()
                });
                n == 1
            })
            .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let jobs_commit = async || {
            let mut tx = here.begin().await.unwrap();
            tx.wake_everywhere_on_commit(Topic::Jobs).await.unwrap();
            tx.commit().await.unwrap();
        };

        // In this process: the topic's waiters wake, the other topic's do not.
        let events = here.commit_signal(Topic::Events);
        let jobs = here.commit_signal(Topic::Jobs);
        assert!(
            fires(&jobs, PROMPT, jobs_commit).await,
            "a job commit wakes the workers"
        );
        assert!(
            !fires(&events, QUIET, jobs_commit).await,
            "a job commit wakes no consumer"
        );
        assert!(
            fires(&events, PROMPT, async || {
                append_one(&here, "test.wake").await;
            })
            .await,
            "an append wakes the consumers"
        );
        assert!(
            !fires(&jobs, QUIET, async || {
                append_one(&here, "test.wake").await;
            })
            .await,
            "an append wakes no worker"
        );

        if listener.is_some() {
            // Its own notification coming back through LISTEN does not wake this
            // process a second time: `here` has no listener, so listen in `there`
            // for `there`'s own commit.
            let there_events = there.commit_signal(Topic::Events);
            let notified = there_events.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            append_one(&there, "test.wake").await;
            tokio::time::timeout(PROMPT, notified)
                .await
                .expect("woken at commit");
            assert!(
                !fires(&there_events, QUIET, async || {}).await,
                "the process's own notification wakes it again"
            );
            // Another process's commits reach it, by topic.
            let there_jobs = there.commit_signal(Topic::Jobs);
            assert!(
                fires(&there_jobs, PROMPT, jobs_commit).await,
                "another process's job commit"
            );
            assert!(
                !fires(&there_events, QUIET, jobs_commit).await,
                "wakes no consumer there"
            );
            assert!(
                fires(&there_events, PROMPT, async || {
                    append_one(&here, "test.wake").await;
                })
                .await,
                "another process's append wakes its consumers"
            );
        }
        // No receiver on SQLite: there is no listener.
        let _ = stop.send(true);
        if let Some(listener) = listener {
            tokio::time::timeout(WAIT, listener)
                .await
                .expect("listener stops")
                .unwrap();
        }
    }
);
