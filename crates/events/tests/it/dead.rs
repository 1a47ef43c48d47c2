//! An event that keeps failing is parked as dead after `max_attempts`, later
//! events still flow, and an admin's redelivery runs it once more, exactly once.

use scaleshop_testkit::fixture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use scaleshop_events::dispatch::DeadEvents;
use uuid::Uuid;

use crate::helpers::*;

scaleshop_testkit::both!(
    dead_event_is_parked_then_redelivered_once,
    |backend| async move {
        const NAME: &str = "dead_probe";
        let db = fresh(backend).await;
        let appended = append_in_one_tx(&db, &["test.ok", "test.poison"]).await;
        let poison = appended[1].0;
        let broken = Arc::new(AtomicBool::new(true));
        let consumer = poisoned(NAME, poison, &broken);
        let settings = settings();
        let running = start(&db, settings.clone(), std::slice::from_ref(&consumer)).await;
        // Later events, appended while the poison event is being retried.
        let mut later = Vec::new();
        for _ in 0..3 {
            later.push(append_one(&db, "test.later").await);
        }

        let dead_events = DeadEvents::new(db.clone());
        eventually("the poison event parked", async || {
            dead_events.get(NAME, poison).await.unwrap().is_some()
        })
        .await;
        let top = head(&db).await;
        eventually("later events delivered", async || {
            position(&db, NAME).await == top
        })
        .await;

        let dead = dead_events.get(NAME, poison).await.unwrap().unwrap();
        let max = i32::try_from(settings.max_attempts).unwrap();
        assert_eq!(dead.state, "dead");
        assert_eq!(dead.attempts, max);
        assert_eq!(dead.sequence, appended[1].1);
        assert_eq!(dead.consumer, NAME);
        assert_eq!(dead.last_error, format!("poison attempt {max}"));
        assert_eq!(consumer.calls_for(poison).await.len(), 3);
        assert_eq!(
            effects_of_event(&db, NAME, poison).await,
            0,
            "failed attempts leave nothing"
        );
        assert_eq!(inbox_has(&db, NAME, poison).await, 0);
        for (id, _) in appended.iter().take(1).chain(&later) {
            assert_eq!(effects_of_event(&db, NAME, *id).await, 1, "effect of {id}");
        }
        let listed = dead_events.list(Some(NAME), None, 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].event_id, poison);
        assert_eq!(dead_events.list(None, None, 10).await.unwrap().len(), 1);
        // Keyset pagination: nothing after the only row.
        let after = Some((listed[0].sequence, NAME.to_owned()));
        assert!(dead_events.list(None, after, 10).await.unwrap().is_empty());
        assert!(
            dead_events
                .list(Some("someone_else"), None, 10)
                .await
                .unwrap()
                .is_empty()
        );

        // Fixed: redeliver it.
        broken.store(false, Ordering::SeqCst);
        assert!(dead_events.redeliver(NAME, poison).await.unwrap());
        eventually("the redelivery", async || {
            dead_events.get(NAME, poison).await.unwrap().unwrap().state == "redelivered"
        })
        .await;
        assert_eq!(effects_of_event(&db, NAME, poison).await, 1);
        assert_eq!(inbox_has(&db, NAME, poison).await, 1);
        assert_eq!(consumer.calls_for(poison).await.len(), 4);

        // Nothing more to redeliver.
        assert!(!dead_events.redeliver(NAME, poison).await.unwrap());
        assert!(!dead_events.redeliver(NAME, Uuid::now_v7()).await.unwrap());
        assert!(!dead_events.redeliver("someone_else", poison).await.unwrap());

        // Give the dispatcher a few polls: still exactly once.
        tokio::time::sleep(settings.poll * 4).await;
        running.stop().await;
        assert_eq!(effects_of_event(&db, NAME, poison).await, 1);
        assert_eq!(effect_count(&db, NAME).await, 5);
        assert_eq!(inbox(&db, NAME).await, (5, 5));
        assert_eq!(
            dead_events.get(NAME, poison).await.unwrap().unwrap().state,
            "redelivered"
        );
    }
);

scaleshop_testkit::both!(
    failed_redelivery_parks_the_event_again,
    |backend| async move {
        const NAME: &str = "dead_again_probe";
        let db = fresh(backend).await;
        let (poison, _) = append_one(&db, "test.poison").await;
        let broken = Arc::new(AtomicBool::new(true));
        let consumer = Recorder::new(NAME)
            .failing({
                let broken = broken.clone();
                move |_, prior| {
                    broken
                        .load(Ordering::SeqCst)
                        .then(|| format!("attempt {}", prior + 1))
                }
            })
            .build();
        let settings = settings();
        let running = start(&db, settings.clone(), std::slice::from_ref(&consumer)).await;
        let dead_events = DeadEvents::new(db.clone());
        eventually("the event parked", async || {
            dead_events.get(NAME, poison).await.unwrap().is_some()
        })
        .await;

        // Still broken: the redelivery fails and the event is dead again.
        assert!(dead_events.redeliver(NAME, poison).await.unwrap());
        eventually("the failed redelivery", async || {
            consumer.calls_for(poison).await.len() == 4
        })
        .await;
        eventually("the event dead again", async || {
            dead_events.get(NAME, poison).await.unwrap().unwrap().state == "dead"
        })
        .await;
        let dead = dead_events.get(NAME, poison).await.unwrap().unwrap();
        assert_eq!(dead.attempts, 4);
        assert_eq!(dead.last_error, "attempt 4");
        assert_eq!(effects_of_event(&db, NAME, poison).await, 0);

        // Fixed: the next redelivery succeeds.
        broken.store(false, Ordering::SeqCst);
        assert!(dead_events.redeliver(NAME, poison).await.unwrap());
        eventually("the redelivery", async || {
            dead_events.get(NAME, poison).await.unwrap().unwrap().state == "redelivered"
        })
        .await;
        running.stop().await;
        assert_eq!(effects_of_event(&db, NAME, poison).await, 1);
        assert_eq!(consumer.calls_for(poison).await.len(), 5);
    }
);
