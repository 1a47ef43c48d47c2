//! A failing handler is retried with backoff; its failed attempts leave no effect
//! and the events behind it wait for it.

use scaleshop_testkit::fixture;
use std::time::Duration;

use crate::helpers::*;

scaleshop_testkit::both!(
    failing_handler_is_retried_with_backoff_then_succeeds,
    |backend| async move {
        const NAME: &str = "retry_probe";
        let db = fresh(backend).await;
        let appended = append_in_one_tx(&db, &["test.first", "test.flaky", "test.after"]).await;
        let flaky = appended[1].0;
        let consumer = Recorder::new(NAME)
            .failing(move |event, prior| {
                (event.id == flaky && prior < 2).then(|| format!("attempt {} fails", prior + 1))
            })
            .build();
        let settings = settings();
        let running = start(&db, settings.clone(), std::slice::from_ref(&consumer)).await;

        eventually("three effects", async || effect_count(&db, NAME).await == 3).await;
        at_the_head(&db, NAME).await;
        running.stop().await;

        // The failed attempts' effects were rolled back with their transaction.
        each_effect_once(&db, NAME, &appended).await;
        let attempts = consumer.calls_for(flaky).await;
        assert_eq!(
            attempts.len(),
            3,
            "two failures, then the success: {attempts:?}"
        );
        // Attempt times come from the same clock as the retry time; the dispatcher
        // stores microseconds, hence the 1 ms of slack.
        for pair in attempts.windows(2) {
            let gap = (pair[1].at - pair[0].at).to_std().unwrap_or_default();
            assert!(
                gap + Duration::from_millis(1) >= settings.min_backoff,
                "retried after {gap:?}, before the minimum backoff {:?}",
                settings.min_backoff
            );
        }
        // The event behind it waited: delivery stays in order.
        let after = consumer.calls_for(appended[2].0).await;
        assert_eq!(after.len(), 1);
        assert!(
            after[0].at >= attempts[2].at,
            "a later event overtook the retried one"
        );
        let order: Vec<i64> = consumer.calls().await.iter().map(|c| c.sequence).collect();
        let (s1, s2, s3) = (appended[0].1, appended[1].1, appended[2].1);
        assert_eq!(order, vec![s1, s2, s2, s2, s3]);

        // Nothing parked; the retry state is cleared.
        let dead = scaleshop_events::dispatch::DeadEvents::new(db.clone())
            .list(Some(NAME), None, 10)
            .await
            .unwrap();
        assert!(dead.is_empty(), "{dead:?}");
        const STATE: &str = "SELECT attempts, retry_at IS NULL, last_error IS NULL FROM event_consumers WHERE name = $1";
        let state: (i32, bool, bool) = scaleshop_db::with_pool!(db, pool => {
            scaleshop_db::sqlx::query_as(STATE).bind(NAME).fetch_one(pool).await.unwrap()
        });
        assert_eq!(state, (0, true, true));
        assert_eq!(inbox(&db, NAME).await, (3, 3));
    }
);

scaleshop_testkit::both!(
    panicking_handler_is_retried_like_a_failure,
    |backend| async move {
        const NAME: &str = "panic_probe";
        let db = fresh(backend).await;
        let appended = append_in_one_tx(&db, &["test.first", "test.panics", "test.after"]).await;
        let panics = appended[1].0;
        let consumer = Recorder::new(NAME)
            .panicking(move |event, prior| event.id == panics && prior == 0)
            .build();
        let running = start(&db, settings(), std::slice::from_ref(&consumer)).await;

        // A panic is a failed attempt (as a panicking job handler is for the job
        // queue): the event is tried again and delivery goes on.
        let delivered = holds_within(WAIT, async || effect_count(&db, NAME).await == 3).await;
        let calls = consumer.calls_for(panics).await.len();
        let at = position(&db, NAME).await;
        let (owner, _) = lease(&db, NAME).await;
        running.stop().await;
        assert!(
            delivered,
            "the consumer stopped after its handler panicked once: after {WAIT:?}, {} of 3 \
         effects, {calls} call(s) of the panicking event, position {at}, \
         lease still owned by {owner:?}",
            effect_count(&db, NAME).await
        );
        each_effect_once(&db, NAME, &appended).await;
        assert_eq!(calls, 2);
    }
);

scaleshop_testkit::both!(
    a_failure_inside_a_batch_undoes_only_its_own_event,
    |backend| async move {
        const NAME: &str = "batch_probe";
        let db = fresh(backend).await;
        // One transaction, so the dispatcher finds all 80 at once: more than one
        // batch (60 at most), with a failing event in the middle of the first.
        let kinds: Vec<&'static str> = (0..80)
            .map(|i| if i == 29 { "test.flaky" } else { "test.fine" })
            .collect();
        let appended = append_in_one_tx(&db, &kinds).await;
        let flaky = appended[29].0;
        let before_flaky = appended[28].1;
        let consumer = Recorder::new(NAME)
            .failing(move |event, prior| {
                (event.id == flaky && prior < 2).then(|| format!("attempt {} fails", prior + 1))
            })
            .build();
        let mut settings = settings();
        // Long enough to look at the position between the attempts.
        settings.min_backoff = Duration::from_millis(400);
        settings.max_backoff = Duration::from_millis(400);
        let running = start(&db, settings, std::slice::from_ref(&consumer)).await;

        // The events before the failing one committed, without waiting for it.
        eventually("the events before the failing one", async || {
            position(&db, NAME).await == before_flaky
        })
        .await;
        assert_eq!(effect_count(&db, NAME).await, 29);
        assert_eq!(consumer.calls_for(flaky).await.len(), 1);

        eventually("every effect", async || effect_count(&db, NAME).await == 80).await;
        at_the_head(&db, NAME).await;
        running.stop().await;

        // Each event's effect once (the failed attempts' were undone with their
        // savepoint), each handler called once per attempt, in log order.
        each_effect_once(&db, NAME, &appended).await;
        let order: Vec<i64> = consumer.calls().await.iter().map(|c| c.sequence).collect();
        let mut expected: Vec<i64> = appended.iter().map(|(_, s)| *s).collect();
        expected.splice(29..30, [appended[29].1; 3]);
        assert_eq!(order, expected);
        assert_eq!(inbox(&db, NAME).await, (80, 80));
    }
);

/// Waits until the consumer's position is the head of the log.
async fn at_the_head(db: &scaleshop_db::Database, consumer: &str) {
    let top = head(db).await;
    eventually("the position at the head", async || {
        position(db, consumer).await == top
    })
    .await;
}

/// Every appended event left exactly one effect.
async fn each_effect_once(
    db: &scaleshop_db::Database,
    consumer: &str,
    appended: &[(uuid::Uuid, i64)],
) {
    for (id, _) in appended {
        assert_eq!(
            effects_of_event(db, consumer, *id).await,
            1,
            "effect of {id}"
        );
    }
}
