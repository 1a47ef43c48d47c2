//! The log over a real NATS JetStream server (`nats-server` with
//! `sync_interval: always`): the relay publishes the outbox once and in order,
//! durable pull consumers handle every event once and in order, a failing event
//! is parked and dead-lettered, and neither a consumer process nor the broker
//! dying (kill -9, SIGSTOP) loses or repeats an effect.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use scaleshop_db::{Database, sqlx, with_pool};
use scaleshop_events::dispatch::DeadEvents;
use scaleshop_events::nats::{self as transport, NatsSettings};
use scaleshop_events::{Consumer, Dispatcher, DispatcherSettings, Event, NewEvent};
use scaleshop_testkit::{NatsServer, fixture};
use tokio::sync::watch;
use uuid::Uuid;

use crate::helpers::*;

fn nats_settings(server: &NatsServer) -> NatsSettings {
    let mut settings = NatsSettings::new(server.url());
    settings.timeout = Duration::from_secs(2);
    settings.ack_wait = Duration::from_secs(2);
    settings
}

/// A dispatcher over NATS with these consumers.
async fn start_nats(
    db: &Database,
    settings: DispatcherSettings,
    nats: &NatsSettings,
    consumers: &[Arc<Recorder>],
) -> Running {
    let mut dispatcher = Dispatcher::new(db.clone(), settings).with_nats(nats.clone());
    for consumer in consumers {
        dispatcher.subscribe(consumer.clone() as Arc<dyn Consumer>);
    }
    start_dispatcher(dispatcher).await
}

async fn relay_position(db: &Database) -> i64 {
    const Q: &str = "SELECT position FROM event_relays WHERE name = $1";
    let position: Option<i64> = with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind(transport::RELAY).fetch_optional(pool).await.expect("relay position")
    });
    position.unwrap_or(0)
}

async fn set_relay_position(db: &Database, to: i64) {
    const Q: &str = "UPDATE event_relays SET position = $2 WHERE name = $1";
    with_pool!(db, pool => {
        sqlx::query(Q).bind(transport::RELAY).bind(to).execute(pool).await.expect("set relay position");
    });
}

/// A message read back from a stream: its subject, `Nats-Msg-Id`, other headers
/// and the event it carries.
#[derive(Debug)]
struct Stored {
    subject: String,
    msg_id: Option<String>,
    consumer: Option<String>,
    event: Event,
}

/// Every message of a stream, in stream order, through an ephemeral consumer.
async fn read_stream(url: &str, name: &str) -> Vec<Stored> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let context = jetstream::new(client);
    let mut stream: stream::Stream = context.get_stream(name).await.expect("the stream");
    let count = stream.info().await.expect("stream info").state.messages as usize;
    let reader = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("ephemeral consumer");
    let mut stored = Vec::with_capacity(count);
    for _ in 0..10_000 {
        if stored.len() >= count {
            break;
        }
        let mut batch = reader
            .fetch()
            .max_messages(1000)
            .messages()
            .await
            .expect("fetch");
        while let Some(message) = batch.next().await {
            let message = message.expect("message");
            let header = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            stored.push(Stored {
                subject: message.subject.to_string(),
                msg_id: header("Nats-Msg-Id"),
                consumer: header("Scaleshop-Consumer"),
                event: serde_json::from_slice(&message.payload).expect("an event"),
            });
        }
    }
    assert_eq!(stored.len(), count, "read the whole stream {name}");
    stored
}

/// The events of the log's stream: each once, in the log's order.
async fn assert_stream_is_the_log(db: &Database, url: &str) -> Vec<Stored> {
    let stored = read_stream(url, transport::STREAM).await;
    let log = scaleshop_events::EventLog::new(db.clone())
        .list(0, 1_000_000)
        .await
        .expect("the log");
    let sequences: Vec<i64> = stored.iter().map(|s| s.event.sequence).collect();
    let expected: Vec<i64> = log.iter().map(|e| e.sequence).collect();
    assert_eq!(
        sequences, expected,
        "the stream holds the log, once, in order"
    );
    for (stored, event) in stored.iter().zip(&log) {
        assert_eq!(&stored.event, event);
        assert_eq!(stored.subject, transport::subject(&event.kind));
        assert_eq!(
            stored.msg_id.as_deref(),
            Some(event.id.to_string().as_str())
        );
    }
    stored
}

/// Every event of the log handled once by `consumer` (those it wants), in the
/// log's order of first handling.
async fn assert_each_once_in_order(db: &Database, consumer: &Recorder, kinds: Option<&[&str]>) {
    let log = scaleshop_events::EventLog::new(db.clone())
        .list(0, 1_000_000)
        .await
        .expect("the log");
    let wanted: Vec<i64> = log
        .iter()
        .filter(|e| kinds.is_none_or(|k| k.contains(&e.kind.as_str())))
        .map(|e| e.sequence)
        .collect();
    let effects = effects(db, consumer.name()).await;
    let handled: Vec<i64> = effects.iter().map(|(_, sequence, _)| *sequence).collect();
    assert_eq!(handled, wanted, "each wanted event's effect exactly once");
    // First calls in handling order follow the log's order.
    let mut seen = HashSet::new();
    let first_calls: Vec<i64> = consumer
        .calls()
        .await
        .into_iter()
        .filter(|c| seen.insert(c.event_id))
        .map(|c| c.sequence)
        .collect();
    assert!(
        first_calls.windows(2).all(|w| w[0] < w[1]),
        "handled in the log's order"
    );
}

async fn append_many(db: &Database, transactions: usize, per_transaction: usize) {
    let kinds = vec!["test.nats"; per_transaction];
    for _ in 0..transactions {
        append_in_one_tx(db, &kinds).await;
    }
}

scaleshop_testkit::both!(
    relay_publishes_the_outbox_once_in_order_and_reconciles_with_the_stream,
    |backend| async move {
        let server = NatsServer::start();
        let nats = nats_settings(&server);
        let db = fresh(backend).await;
        append_many(&db, 20, 10).await;
        append_in_one_tx(&db, &["test.other", "test.nats"]).await;
        let running = start_nats(&db, settings(), &nats, &[]).await;
        let top = head(&db).await;
        eventually("the relay caught up", async || {
            relay_position(&db).await == top
        })
        .await;
        assert_stream_is_the_log(&db, &server.url()).await;
        running.stop().await;

        // A relay whose saved position was lost (or never saved after its
        // acks) publishes nothing twice: it reconciles with the stream.
        set_relay_position(&db, 3).await;
        append_many(&db, 2, 5).await;
        let running = start_nats(&db, settings(), &nats, &[]).await;
        let top = head(&db).await;
        eventually("the relay caught up again", async || {
            relay_position(&db).await == top
        })
        .await;
        let stored = assert_stream_is_the_log(&db, &server.url()).await;
        assert_eq!(stored.len(), 212);
        running.stop().await;
    }
);

scaleshop_testkit::both!(
    durable_consumers_handle_every_event_once_in_order_across_restarts,
    |backend| async move {
        let server = NatsServer::start();
        let nats = nats_settings(&server);
        let db = fresh(backend).await;
        let all = Recorder::new("nats_all").build();
        let some = Recorder::new("nats.some").wants_only(&["test.b"]).build();
        let consumers = [all.clone(), some.clone()];
        let running = start_nats(&db, settings(), &nats, &consumers).await;
        for _ in 0..30 {
            append_in_one_tx(&db, &["test.a", "test.b", "test.a"]).await;
        }
        let top = head(&db).await;
        eventually("both consumers caught up", async || {
            effect_count(&db, "nats_all").await == 90 && effect_count(&db, "nats.some").await == 30
        })
        .await;
        running.stop().await;

        // Written while no consumer runs; a new process picks up where the
        // durable consumers stand.
        for _ in 0..10 {
            append_in_one_tx(&db, &["test.b", "test.a"]).await;
        }
        let all_again = Recorder::new("nats_all").build();
        let some_again = Recorder::new("nats.some").wants_only(&["test.b"]).build();
        let running = start_nats(
            &db,
            settings(),
            &nats,
            &[all_again.clone(), some_again.clone()],
        )
        .await;
        eventually("the new process caught up", async || {
            effect_count(&db, "nats_all").await == 110 && effect_count(&db, "nats.some").await == 40
        })
        .await;
        let newest = head(&db).await;
        eventually("positions at the head", async || {
            position(&db, "nats_all").await == newest
        })
        .await;
        assert!(newest > top);
        assert!(
            all_again.calls().await.iter().all(|c| c.sequence > top),
            "the second process saw only the new events"
        );
        assert_each_once_in_order(&db, &all_again, None).await;
        assert_each_once_in_order(&db, &some_again, Some(&["test.b"])).await;
        running.stop().await;
    }
);

scaleshop_testkit::both!(
    failing_event_is_parked_dead_lettered_then_redelivered_once,
    |backend| async move {
        const NAME: &str = "nats_dead_probe";
        let server = NatsServer::start();
        let nats = nats_settings(&server);
        let db = fresh(backend).await;
        let appended = append_in_one_tx(&db, &["test.ok", "test.poison", "test.ok"]).await;
        let poison = appended[1].0;
        let broken = Arc::new(AtomicBool::new(true));
        let consumer = poisoned(NAME, poison, &broken);
        let settings = settings();
        let running = start_nats(
            &db,
            settings.clone(),
            &nats,
            std::slice::from_ref(&consumer),
        )
        .await;
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
        assert_eq!(dead.attempts, max);
        assert_eq!(dead.last_error, format!("poison attempt {max}"));
        assert_eq!(consumer.calls_for(poison).await.len(), 3);
        assert_eq!(effects_of_event(&db, NAME, poison).await, 0);
        assert_eq!(effects_of_event(&db, NAME, appended[2].0).await, 1);

        // The copy on the dead-letter stream.
        let url = server.url();
        eventually("the dead-letter copy", async || {
            !read_stream(&url, transport::DEAD_STREAM).await.is_empty()
        })
        .await;
        let dead_letters = read_stream(&url, transport::DEAD_STREAM).await;
        assert_eq!(dead_letters.len(), 1);
        assert_eq!(dead_letters[0].event.id, poison);
        assert_eq!(dead_letters[0].consumer.as_deref(), Some(NAME));
        assert_eq!(
            dead_letters[0].subject,
            format!("scaleshop.dead.{}", transport::durable_name(NAME))
        );

        // Redelivery, once the handler works: the effect happens exactly once.
        broken.store(false, Ordering::SeqCst);
        assert!(dead_events.redeliver(NAME, poison).await.unwrap());
        eventually("the redelivery", async || {
            dead_events.get(NAME, poison).await.unwrap().unwrap().state == "redelivered"
        })
        .await;
        assert_eq!(effects_of_event(&db, NAME, poison).await, 1);
        running.stop().await;
    }
);

scaleshop_testkit::both!(
    consumer_process_killed_mid_batch_loses_and_repeats_nothing,
    |backend| async move {
        const NAME: &str = "nats_crash_probe";
        let server = NatsServer::start();
        let nats = nats_settings(&server);
        let (url, dir) = scaleshop_testkit::fresh(backend).await;
        let db = open(url.as_deref(), &dir).await;
        let settings = settings();
        append_many(&db, 20, 10).await;

        // The first process handles slowly and dies in the middle.
        let doomed = Crashable::new();
        let first = Recorder::new(NAME)
            .tag("first")
            .pause(Duration::from_millis(5))
            .build();
        let (_stop, shutdown) = watch::channel(false);
        doomed
            .handle()
            .spawn({
                let first = first.clone();
                let settings = settings.clone();
                // Its own connection, which dies with it.
                let nats = nats_settings(&server);
                let url = url.clone();
                let dir = dir.clone();
                async move {
                    let db = open(url.as_deref(), &dir).await;
                    let mut dispatcher = Dispatcher::new(db, settings).with_nats(nats);
                    dispatcher.subscribe(first);
                    drop(dispatcher.start(shutdown).await.expect("start"));
                }
            })
            .await
            .expect("first process started");
        eventually("the first process at work", async || {
            effect_count(&db, NAME).await >= 20
        })
        .await;
        doomed.crash();
        let handled_before = effect_count(&db, NAME).await;
        assert!(handled_before < 200, "crashed mid-batch ({handled_before})");

        // The second process takes the consumer over once the lease runs out.
        let second = Recorder::new(NAME).tag("second").build();
        let running = start_nats(&db, settings, &nats, std::slice::from_ref(&second)).await;
        eventually("every event handled", async || {
            effect_count(&db, NAME).await >= 200
        })
        .await;
        let log = scaleshop_events::EventLog::new(db.clone())
            .list(0, 1000)
            .await
            .unwrap();
        let handled: Vec<i64> = effects(&db, NAME).await.iter().map(|e| e.1).collect();
        let expected: Vec<i64> = log.iter().map(|e| e.sequence).collect();
        assert_eq!(handled, expected, "each event's effect exactly once");
        assert!(!second.calls().await.is_empty());
        running.stop().await;
    }
);

/// Appends `total` events, `per_transaction` at a time, each transaction's
/// ids recorded once it committed (the acknowledged writes).
async fn writer(db: Database, total: usize, per_transaction: usize) -> Vec<Uuid> {
    let mut committed = Vec::with_capacity(total);
    while committed.len() < total {
        let mut tx = db.begin().await.expect("begin");
        let mut ids = Vec::new();
        for _ in 0..per_transaction.min(total - committed.len()) {
            let event = NewEvent::raw("test.load", 1, Uuid::now_v7(), serde_json::json!({}));
            scaleshop_events::append(&mut tx, &event)
                .await
                .expect("append");
            ids.push(event.id);
        }
        tx.commit().await.expect("commit");
        committed.extend(ids);
    }
    committed
}

scaleshop_testkit::both!(
    nats_killed_twenty_times_under_50000_events_loses_nothing,
    [postgres],
    |backend| async move {
        const NAME: &str = "nats_kill_probe";
        const TOTAL: usize = 50_000;
        let mut server = NatsServer::start();
        let nats = nats_settings(&server);
        let db = fresh(backend).await;
        let consumer = Recorder::new(NAME).build();
        let running = start_nats(&db, settings(), &nats, std::slice::from_ref(&consumer)).await;
        let writing = tokio::spawn(writer(db.clone(), TOTAL, 50));
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            server.kill();
            tokio::time::sleep(Duration::from_millis(100)).await;
            server.restart();
        }
        let committed = tokio::time::timeout(Duration::from_secs(300), writing)
            .await
            .expect("the writer finishes")
            .expect("the writer");
        assert_eq!(committed.len(), TOTAL, "writes never waited for NATS");
        eventually_within(
            Duration::from_secs(300),
            "every event handled",
            async || effect_count(&db, NAME).await as usize >= TOTAL,
        )
        .await;
        let top = head(&db).await;
        eventually("the relay caught up", async || {
            relay_position(&db).await == top
        })
        .await;
        assert_stream_is_the_log(&db, &server.url()).await;
        let handled: HashSet<String> = effects(&db, NAME).await.into_iter().map(|e| e.0).collect();
        assert_eq!(
            effect_count(&db, NAME).await as usize,
            TOTAL,
            "no double effect"
        );
        for id in &committed {
            assert!(handled.contains(&id.to_string()), "event {id} handled");
        }
        running.stop().await;
    }
);

scaleshop_testkit::both!(
    nats_frozen_for_60_s_writes_go_on_and_the_backlog_drains,
    [postgres],
    |backend| async move {
        const NAME: &str = "nats_freeze_probe";
        let server = NatsServer::start();
        let nats = nats_settings(&server);
        let db = fresh(backend).await;
        let consumer = Recorder::new(NAME).build();
        let running = start_nats(&db, settings(), &nats, std::slice::from_ref(&consumer)).await;
        append_many(&db, 10, 10).await;
        eventually("first events handled", async || {
            effect_count(&db, NAME).await == 100
        })
        .await;

        server.signal("-STOP");
        let frozen = std::time::Instant::now();
        let mut written = 100;
        while frozen.elapsed() < Duration::from_secs(60) {
            let started = std::time::Instant::now();
            append_many(&db, 1, 10).await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a write waited on NATS"
            );
            written += 10;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(effect_count(&db, NAME).await < written, "NATS was frozen");
        server.signal("-CONT");
        eventually_within(Duration::from_secs(30), "the backlog drained", async || {
            effect_count(&db, NAME).await == written
        })
        .await;
        assert_each_once_in_order(&db, &consumer, None).await;
        running.stop().await;
    }
);

scaleshop_testkit::both!(
    a_stream_of_another_database_is_never_relayed_into,
    |backend| async move {
        let server = NatsServer::start();
        let nats = nats_settings(&server);
        let first = fresh(backend).await;
        append_many(&first, 1, 5).await;
        let running = start_nats(&first, settings(), &nats, &[]).await;
        eventually("the first database relayed", async || {
            relay_position(&first).await == 5
        })
        .await;
        running.stop().await;

        // Another database (its own log, sequences from 1 again) on the same
        // stream: its relay refuses, rather than skip or mix events.
        let second = fresh(backend).await;
        append_many(&second, 1, 8).await;
        let running = start_nats(&second, settings(), &nats, &[]).await;
        let relayed = holds_within(Duration::from_secs(2), async || {
            relay_position(&second).await > 0
        })
        .await;
        assert!(!relayed, "the second database's relay published");
        let stored = read_stream(&server.url(), transport::STREAM).await;
        assert_eq!(stored.len(), 5, "the stream holds the first log only");
        running.stop().await;
    }
);
