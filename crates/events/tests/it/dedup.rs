//! Redelivery is deduplicated by the inbox: moving a consumer's position back
//! (while its dispatcher runs, or before a new one starts) walks the log again
//! without running the handler twice.

use crate::helpers::*;
use scaleshop_testkit::fixture;

scaleshop_testkit::both!(
    redelivery_after_a_position_reset_is_deduplicated,
    |backend| async move {
        const NAME: &str = "dedup_probe";
        let db = fresh(backend).await;
        let consumer = Recorder::new(NAME).build();

        let mut appended = append_in_one_tx(&db, &["test.a", "test.b", "test.c"]).await;
        for _ in 0..7 {
            appended.extend(append_in_one_tx(&db, &["test.d"]).await);
        }
        let running = start(&db, settings(), std::slice::from_ref(&consumer)).await;
        let top = head(&db).await;
        eventually("first delivery", async || position(&db, NAME).await == top).await;
        assert_eq!(effect_count(&db, NAME).await, 10);

        // Back to the start while the dispatcher runs: it walks the log again.
        set_position(&db, NAME, 0).await;
        eventually("the walk back to the head", async || {
            position(&db, NAME).await == top
        })
        .await;
        // Once more, half-way.
        set_position(&db, NAME, appended[4].1).await;
        eventually("the second walk back to the head", async || {
            position(&db, NAME).await == top
        })
        .await;
        running.stop().await;

        // More events, then a reset and a new dispatcher (a restart).
        appended.extend(append_in_one_tx(&db, &["test.e", "test.e", "test.e"]).await);
        appended.extend(append_in_one_tx(&db, &["test.f", "test.f"]).await);
        set_position(&db, NAME, 0).await;
        let running = start(&db, settings(), std::slice::from_ref(&consumer)).await;
        let top = head(&db).await;
        eventually("delivery after the restart", async || {
            position(&db, NAME).await == top
        })
        .await;
        running.stop().await;

        assert_eq!(appended.len(), 15);
        assert_eq!(
            consumer.calls().await.len(),
            15,
            "the handler ran once per event"
        );
        assert_eq!(effect_count(&db, NAME).await, 15, "one effect per event");
        for (id, _) in &appended {
            assert_eq!(effects_of_event(&db, NAME, *id).await, 1, "effect of {id}");
            assert_eq!(inbox_has(&db, NAME, *id).await, 1, "inbox row of {id}");
        }
        assert_eq!(
            inbox(&db, NAME).await,
            (15, 15),
            "one inbox row per (consumer, event)"
        );
    }
);
