//! Order and selection: every event once, in sequence order; consumers only get the
//! types they want, and their position still moves past the others.

use scaleshop_testkit::fixture;
use std::collections::HashSet;

use scaleshop_events::DispatcherSettings;

use crate::helpers::*;

scaleshop_testkit::both!(
    delivers_each_event_once_in_sequence_order,
    |backend| async move {
        const NAME: &str = "order_probe";
        let db = fresh(backend).await;
        let consumer = Recorder::new(NAME).build();

        // Some before the dispatcher starts, the rest while it runs, from concurrent
        // tasks (6 each), several in one transaction: 50 in all.
        let mut appended = Vec::new();
        for _ in 0..10 {
            appended.extend(append_in_one_tx(&db, &["test.early"]).await);
        }
        appended.extend(append_in_one_tx(&db, &["test.early"; 10]).await);
        // A small batch, so delivery crosses batch boundaries.
        let settings = DispatcherSettings {
            batch: 7,
            ..settings()
        };
        let running = start(&db, settings, std::slice::from_ref(&consumer)).await;
        let mut tasks = Vec::new();
        for task in 0..5 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                for round in 0..4 {
                    if (task + round) % 2 == 0 {
                        mine.extend(append_in_one_tx(&db, &["test.pair", "test.pair"]).await);
                    } else {
                        mine.extend(append_in_one_tx(&db, &["test.single"]).await);
                    }
                }
                mine
            }));
        }
        for task in tasks {
            appended.extend(task.await.expect("appender task"));
        }
        assert_eq!(appended.len(), 50);

        eventually("50 effects", async || effect_count(&db, NAME).await == 50).await;
        eventually("the position at the head", async || {
            position(&db, NAME).await == head(&db).await
        })
        .await;
        running.stop().await;

        // The log itself: 50 distinct sequences.
        let sequences: HashSet<i64> = appended.iter().map(|(_, s)| *s).collect();
        assert_eq!(sequences.len(), 50, "sequences are unique");

        let calls = consumer.calls().await;
        assert_eq!(calls.len(), 50, "one call per event, no retries: {calls:?}");
        for pair in calls.windows(2) {
            assert!(
                pair[0].sequence < pair[1].sequence,
                "delivered out of order: {} then {}",
                pair[0].sequence,
                pair[1].sequence
            );
        }
        let delivered: HashSet<_> = calls.iter().map(|c| c.event_id).collect();
        let expected: HashSet<_> = appended.iter().map(|(id, _)| *id).collect();
        assert_eq!(delivered, expected, "every appended event, and only those");
        for call in &calls {
            let sequence = appended
                .iter()
                .find(|(id, _)| *id == call.event_id)
                .unwrap()
                .1;
            assert_eq!(call.sequence, sequence, "the event carries its sequence");
        }

        let rows = effects(&db, NAME).await;
        assert_eq!(rows.len(), 50);
        let distinct: HashSet<_> = rows.iter().map(|(id, ..)| id.clone()).collect();
        assert_eq!(distinct.len(), 50, "one effect per event");
        assert_eq!(inbox(&db, NAME).await, (50, 50));

        // A stopped dispatcher hands the consumer over at once.
        assert_eq!(
            lease(&db, NAME).await,
            (None, None),
            "lease released at shutdown"
        );
    }
);

scaleshop_testkit::both!(
    consumers_only_get_wanted_types_and_pass_the_rest,
    |backend| async move {
        let db = fresh(backend).await;
        let orders = Recorder::new("orders_probe")
            .wants_only(&["order.placed"])
            .build();
        let users = Recorder::new("users_probe")
            .wants_only(&["user.registered", "user.deleted"])
            .build();
        let nothing = Recorder::new("nothing_probe").wants_only(&[]).build();

        let kinds = [
            "order.placed",
            "user.registered",
            "other.thing",
            "order.placed",
            "other.thing",
            "user.deleted",
            "order.placed",
            // The tail is wanted by nobody: positions must still reach the head.
            "other.thing",
            "other.thing",
            "other.thing",
        ];
        let mut appended = Vec::new();
        for kind in kinds {
            appended.push((kind, append_one(&db, kind).await));
        }
        let running = start(
            &db,
            settings(),
            &[orders.clone(), users.clone(), nothing.clone()],
        )
        .await;

        let top = head(&db).await;
        assert_eq!(top, appended.last().unwrap().1.1);
        for name in ["orders_probe", "users_probe", "nothing_probe"] {
            eventually(&format!("{name} at the head"), async || {
                position(&db, name).await == top
            })
            .await;
        }

        // More unwanted events after everything was caught up.
        let later = append_in_one_tx(&db, &["other.thing", "other.thing"]).await;
        let top = later.last().unwrap().1;
        for name in ["orders_probe", "users_probe", "nothing_probe"] {
            eventually(&format!("{name} past the unwanted tail"), async || {
                position(&db, name).await == top
            })
            .await;
        }
        running.stop().await;

        let wanted = |set: &[&str]| -> Vec<i64> {
            appended
                .iter()
                .filter(|(kind, _)| set.contains(kind))
                .map(|(_, (_, sequence))| *sequence)
                .collect()
        };
        let seen = |calls: Vec<Call>| -> Vec<i64> { calls.iter().map(|c| c.sequence).collect() };
        assert_eq!(seen(orders.calls().await), wanted(&["order.placed"]));
        assert!(
            orders
                .calls()
                .await
                .iter()
                .all(|c| c.kind == "order.placed")
        );
        assert_eq!(
            seen(users.calls().await),
            wanted(&["user.registered", "user.deleted"])
        );
        assert!(nothing.calls().await.is_empty());

        assert_eq!(effect_count(&db, "orders_probe").await, 3);
        assert_eq!(effect_count(&db, "users_probe").await, 2);
        assert_eq!(effect_count(&db, "nothing_probe").await, 0);
        // Passed-over events are not recorded as handled.
        assert_eq!(inbox(&db, "orders_probe").await, (3, 3));
        assert_eq!(inbox(&db, "users_probe").await, (2, 2));
        assert_eq!(inbox(&db, "nothing_probe").await, (0, 0));
    }
);
