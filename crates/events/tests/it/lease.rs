//! Two dispatchers (two owners, two database handles, as two processes would
//! have) serve the same consumer: one at a time under the lease; when the leader
//! crashes without releasing it, the other takes over once it expires.
//!
//! The crash: the leader runs on a runtime of its own that is shut down in the
//! background, which drops its tasks mid-flight without running their shutdown
//! path (the lease stays taken). Aborting the handle that `Dispatcher::start`
//! returns would not do: the per-consumer loops are separate tasks.

use scaleshop_testkit::fixture;
use std::sync::Arc;

use tokio::sync::watch;

use crate::helpers::*;

scaleshop_testkit::both!(
    lease_moves_to_the_follower_after_the_leader_crashes,
    |backend| async move {
        const NAME: &str = "lease_probe";
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        let db = open(url.as_deref(), &dir).await;
        let in_flight = Arc::new(InFlight::default());
        let settings = settings();
        let handler_pause = std::time::Duration::from_millis(2);

        // The leader, on its own runtime and its own database handle.
        let leader_runtime = Crashable::new();
        let leader = Recorder::new(NAME)
            .tag("leader")
            .pause(handler_pause)
            .in_flight(in_flight.clone())
            .build();
        let (_leader_stop, leader_shutdown) = watch::channel(false);
        leader_runtime
            .handle()
            .spawn({
                let leader = leader.clone();
                let settings = settings.clone();
                let url = url.clone();
                let dir = dir.clone();
                async move {
                    let db = open(url.as_deref(), &dir).await;
                    let mut dispatcher = scaleshop_events::Dispatcher::new(db, settings);
                    dispatcher.subscribe(leader);
                    // The handle is dropped: the loops run on.
                    drop(
                        dispatcher
                            .start(leader_shutdown)
                            .await
                            .expect("start leader"),
                    );
                }
            })
            .await
            .expect("leader started");

        let mut first = Vec::new();
        for _ in 0..10 {
            first.push(append_one(&db, "test.lease").await);
        }
        eventually("the leader's deliveries", async || {
            effect_count(&db, NAME).await == 10
        })
        .await;
        let (leader_owner, _) = lease(&db, NAME).await;
        let leader_owner = leader_owner.expect("the leader holds the lease");

        // The follower: same consumer name, another owner, another handle.
        let follower = Recorder::new(NAME)
            .tag("follower")
            .pause(handler_pause)
            .in_flight(in_flight.clone())
            .build();
        let running = start(&db, settings.clone(), std::slice::from_ref(&follower)).await;
        let mut second = Vec::new();
        for _ in 0..10 {
            second.push(append_one(&db, "test.lease").await);
        }
        eventually("deliveries with both running", async || {
            effect_count(&db, NAME).await == 20
        })
        .await;
        // The leader renews its lease every poll: the follower never got a turn.
        assert!(
            follower.calls().await.is_empty(),
            "the follower delivered while the leader was alive"
        );
        assert_eq!(
            lease(&db, NAME).await.0.as_deref(),
            Some(leader_owner.as_str())
        );

        // Crash the leader: its lease stays taken until it expires.
        let (_, leader_until) = lease(&db, NAME).await;
        let leader_until = leader_until.expect("lease time");
        leader_runtime.crash();
        let mut third = Vec::new();
        for _ in 0..10 {
            third.push(append_one(&db, "test.lease").await);
        }
        eventually("the follower's deliveries", async || {
            effect_count(&db, NAME).await == 30
        })
        .await;
        let top = head(&db).await;
        eventually("the position at the head", async || {
            position(&db, NAME).await == top
        })
        .await;
        let (owner, _) = lease(&db, NAME).await;
        assert_ne!(
            owner.as_deref(),
            Some(leader_owner.as_str()),
            "the follower took over"
        );
        running.stop().await;

        // Each event handled once, never by two dispatchers at a time.
        assert_eq!(in_flight.max(), 1, "two handlers ran at once");
        for (id, _) in first.iter().chain(&second).chain(&third) {
            assert_eq!(effects_of_event(&db, NAME, *id).await, 1, "effect of {id}");
        }
        assert_eq!(inbox(&db, NAME).await, (30, 30));
        let rows = effects(&db, NAME).await;
        for (id, _) in first.iter().chain(&second) {
            let row = rows.iter().find(|(e, ..)| *e == id.to_string()).unwrap();
            assert_eq!(row.2, "leader", "event {id}");
        }
        for (id, _) in &third {
            let row = rows.iter().find(|(e, ..)| *e == id.to_string()).unwrap();
            assert_eq!(row.2, "follower", "event {id}");
        }
        // Not before the crashed leader's lease ran out.
        let follower_calls = follower.calls().await;
        assert_eq!(follower_calls.len(), 10);
        assert!(
            follower_calls[0].at >= leader_until,
            "the follower delivered at {} before the leader's lease ended at {leader_until}",
            follower_calls[0].at
        );
    }
);

scaleshop_testkit::both!(
    live_leader_keeps_the_consumer_through_a_long_batch,
    |backend| async move {
        const NAME: &str = "long_batch_probe";
        const EVENTS: usize = 80;
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        let db = open(url.as_deref(), &dir).await;
        let other = open(url.as_deref(), &dir).await;
        let settings = settings();
        // One step delivers the whole backlog (one batch) and, at 30 ms an event, takes
        // about twice the lease.
        let pause = std::time::Duration::from_millis(30);
        let in_flight = Arc::new(InFlight::default());
        let leader = Recorder::new(NAME)
            .tag("leader")
            .pause(pause)
            .in_flight(in_flight.clone())
            .build();
        let follower = Recorder::new(NAME)
            .tag("follower")
            .pause(pause)
            .in_flight(in_flight.clone())
            .build();
        let kinds = ["test.backlog"; EVENTS];
        let appended = append_in_one_tx(&db, &kinds).await;

        let leading = start(&db, settings.clone(), std::slice::from_ref(&leader)).await;
        eventually("the leader started delivering", async || {
            !leader.calls().await.is_empty()
        })
        .await;
        let following = start(&other, settings.clone(), std::slice::from_ref(&follower)).await;
        eventually("the backlog delivered", async || {
            effect_count(&db, NAME).await == i64::try_from(EVENTS).unwrap()
        })
        .await;
        following.stop().await;
        leading.stop().await;

        // Exactly once, whatever happened.
        for (id, _) in &appended {
            assert_eq!(effects_of_event(&db, NAME, *id).await, 1, "effect of {id}");
        }
        assert_eq!(in_flight.max(), 1, "two handlers ran at once");
        // The leader was alive and delivering all along: it should have kept the
        // consumer, and no handler call should have been wasted.
        let (led, followed) = (leader.calls().await.len(), follower.calls().await.len());
        assert_eq!(
            (led, followed),
            (EVENTS, 0),
            "the live leader lost the consumer mid-batch (its lease is renewed once per step, \
         and this step outlasted the lease): leader calls {led}, follower calls {followed}, \
         for {EVENTS} events"
        );
    }
);

// A process whose services only write to the log (no consumer of its own) still
// runs the dispatcher's lease loop; `/readyz` reads its liveness from the beats.
// Each renewal that reaches the database beats, so such a process stays live
// long after its start, and is not once stopped.
scaleshop_testkit::both!(
    a_dispatcher_without_consumers_beats_while_it_runs,
    |backend| async move {
        let db = fresh(backend).await;
        let settings = scaleshop_events::DispatcherSettings {
            renew: std::time::Duration::from_millis(50),
            ..settings()
        };
        let dispatcher = scaleshop_events::Dispatcher::new(db, settings);
        let alive = dispatcher.heartbeat();
        let (stop, shutdown) = watch::channel(false);
        let handle = dispatcher.start(shutdown).await.expect("start");
        let window = std::time::Duration::from_millis(400);
        tokio::time::sleep(window * 3).await;
        assert!(
            alive.alive(window),
            "no beat within {window:?}, long after start"
        );
        let _ = stop.send(true);
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("stops in time")
            .expect("joined");
        tokio::time::sleep(window * 2).await;
        assert!(!alive.alive(window), "beats after it stopped");
    }
);
