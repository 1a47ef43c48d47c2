//! A version change of an event, through the real log: producers append typed
//! events, the dispatcher delivers them, typed consumers read them.
//!
//! The event is made up (`parcel.shipped`), as two builds of the code would know
//! it: the first build publishes and reads v1 (`weight_grams`); a later build
//! made a breaking change (v2: `weight` with an amount and a unit) and reads v1
//! through its up-conversion. A consumer of the first build that meets a v2 event
//! parks it at once with the reason, delivery goes on, and the event is read
//! when a consumer of the later build redelivers it.

use scaleshop_testkit::fixture;
use std::sync::Arc;

use async_trait::async_trait;
use scaleshop_contracts::{Contract, DecodeError, upgrade};
use scaleshop_db::{Database, Tx, sqlx, with_tx};
use scaleshop_events::dispatch::DeadEvents;
use scaleshop_events::{Consumer, Event, EventLog, HandlerError, NewEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::helpers::*;

const SHIPPING: &str = "shipping";

/// What the first build knows.
mod first {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ParcelShipped {
        pub parcel_id: Uuid,
        pub weight_grams: i64,
    }

    impl Contract for ParcelShipped {
        const NAME: &'static str = "parcel.shipped";
        const VERSION: u32 = 1;
    }
}

/// What the later build knows: v2, and v1 kept for the up-conversion.
mod later {
    use super::*;

    pub use super::first::ParcelShipped as ParcelShippedV1;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct Weight {
        pub amount: i64,
        pub unit: String,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ParcelShipped {
        pub parcel_id: Uuid,
        pub weight: Weight,
    }

    impl From<ParcelShippedV1> for ParcelShipped {
        fn from(old: ParcelShippedV1) -> Self {
            Self {
                parcel_id: old.parcel_id,
                weight: Weight {
                    amount: old.weight_grams,
                    unit: "g".into(),
                },
            }
        }
    }

    impl Contract for ParcelShipped {
        const NAME: &'static str = "parcel.shipped";
        const VERSION: u32 = 2;

        fn from_older(version: u32, data: &serde_json::Value) -> Result<Self, DecodeError> {
            upgrade::<ParcelShippedV1, Self>(version, data)
        }
    }
}

/// A consumer of one build: reads every event as `C`, writes its effect row in
/// the delivery's transaction and remembers what it read.
struct Shipping<C> {
    received: Mutex<Vec<(Uuid, i32, C)>>,
}

impl<C> Shipping<C> {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            received: Mutex::new(Vec::new()),
        })
    }
}

impl<C: Clone> Shipping<C> {
    async fn received(&self) -> Vec<(Uuid, i32, C)> {
        self.received.lock().await.clone()
    }
}

#[async_trait]
impl<C: Contract + Clone> Consumer for Shipping<C> {
    fn name(&self) -> &'static str {
        SHIPPING
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == C::NAME
    }

    async fn handle(&self, event: &Event, tx: &mut Tx) -> Result<(), HandlerError> {
        const Q: &str =
            "INSERT INTO effects (consumer, event_id, sequence, tag) VALUES ($1, $2, $3, $4)";
        let parcel: C = event.decode()?;
        let tag = format!("v{}", C::VERSION);
        with_tx!(tx, conn => {
            sqlx::query(Q).bind(SHIPPING).bind(event.id.to_string()).bind(event.sequence).bind(&tag)
                .execute(conn).await.map_err(|e| HandlerError::new(e.to_string()))?;
        });
        self.received
            .lock()
            .await
            .push((event.id, event.version, parcel));
        Ok(())
    }
}

/// Appends one typed event in its own transaction; returns its id.
async fn publish<C: Contract>(db: &Database, payload: &C) -> Uuid {
    let aggregate = Uuid::now_v7();
    let event = NewEvent::typed(aggregate, payload).unwrap();
    let mut tx = db.begin().await.unwrap();
    scaleshop_events::append(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    event.id
}

async fn caught_up(db: &Database) {
    let top = head(db).await;
    eventually("the consumer caught up", async || {
        position(db, SHIPPING).await == top
    })
    .await;
}

scaleshop_testkit::both!(a_v2_producer_with_a_v1_era_consumer, |backend| async move {
    let db = fresh(backend).await;
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    // A producer still on the first build, one already on the later build,
    // then the first again: the log holds both versions.
    let old_before = publish(
        &db,
        &first::ParcelShipped {
            parcel_id: a,
            weight_grams: 500,
        },
    )
    .await;
    let new = publish(
        &db,
        &later::ParcelShipped {
            parcel_id: b,
            weight: later::Weight {
                amount: 2,
                unit: "kg".into(),
            },
        },
    )
    .await;
    let old_after = publish(
        &db,
        &first::ParcelShipped {
            parcel_id: c,
            weight_grams: 700,
        },
    )
    .await;
    let log = EventLog::new(db.clone());
    assert_eq!(log.get(new).await.unwrap().unwrap().version, 2);
    assert_eq!(log.get(old_after).await.unwrap().unwrap().version, 1);

    // The consumer of the first build reads v1 and parks v2 at once (not
    // after `max_attempts` tries: no retry can teach it v2).
    let consumer = Shipping::<first::ParcelShipped>::new();
    let running = start_consumers(&db, settings(), vec![consumer.clone()]).await;
    caught_up(&db).await;
    running.stop().await;
    assert_eq!(
        consumer.received().await,
        vec![
            (
                old_before,
                1,
                first::ParcelShipped {
                    parcel_id: a,
                    weight_grams: 500
                }
            ),
            (
                old_after,
                1,
                first::ParcelShipped {
                    parcel_id: c,
                    weight_grams: 700
                }
            ),
        ]
    );
    let dead_events = DeadEvents::new(db.clone());
    let dead = dead_events.get(SHIPPING, new).await.unwrap().unwrap();
    assert_eq!(dead.state, "dead");
    assert_eq!(dead.attempts, 1, "parked at the first attempt");
    assert_eq!(
        dead.last_error,
        "parcel.shipped v2 is newer than this consumer reads (up to v1): deploy a \
             consumer that reads v2, then redeliver the event"
    );
    assert_eq!(effects_of_event(&db, SHIPPING, new).await, 0);
    assert_eq!(inbox_has(&db, SHIPPING, new).await, 0);

    // The consumer is upgraded to the later build; the admin redelivers.
    let upgraded = Shipping::<later::ParcelShipped>::new();
    let running = start_consumers(&db, settings(), vec![upgraded.clone()]).await;
    assert!(dead_events.redeliver(SHIPPING, new).await.unwrap());
    eventually("the v2 event redelivered", async || {
        dead_events.get(SHIPPING, new).await.unwrap().unwrap().state == "redelivered"
    })
    .await;
    running.stop().await;
    assert_eq!(
        upgraded.received().await,
        vec![(
            new,
            2,
            later::ParcelShipped {
                parcel_id: b,
                weight: later::Weight {
                    amount: 2,
                    unit: "kg".into()
                }
            }
        )],
        "the upgraded consumer read only the parked event, as v2"
    );
    let effects = effects(&db, SHIPPING).await;
    let tags: Vec<_> = effects.iter().map(|(_, _, tag)| tag.as_str()).collect();
    assert_eq!(tags, ["v1", "v2", "v1"], "each event had its effect once");
});

scaleshop_testkit::both!(a_v1_producer_with_a_v2_era_consumer, |backend| async move {
    let db = fresh(backend).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let old = publish(
        &db,
        &first::ParcelShipped {
            parcel_id: a,
            weight_grams: 1250,
        },
    )
    .await;
    let new = publish(
        &db,
        &later::ParcelShipped {
            parcel_id: b,
            weight: later::Weight {
                amount: 3,
                unit: "kg".into(),
            },
        },
    )
    .await;

    let consumer = Shipping::<later::ParcelShipped>::new();
    let running = start_consumers(&db, settings(), vec![consumer.clone()]).await;
    caught_up(&db).await;
    running.stop().await;
    assert_eq!(
        consumer.received().await,
        vec![
            (
                old,
                1,
                later::ParcelShipped {
                    parcel_id: a,
                    weight: later::Weight {
                        amount: 1250,
                        unit: "g".into()
                    }
                }
            ),
            (
                new,
                2,
                later::ParcelShipped {
                    parcel_id: b,
                    weight: later::Weight {
                        amount: 3,
                        unit: "kg".into()
                    }
                }
            ),
        ],
        "v1 read through the up-conversion, v2 as itself"
    );
    let dead_events = DeadEvents::new(db.clone());
    assert!(
        dead_events
            .list(Some(SHIPPING), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(effect_count(&db, SHIPPING).await, 2);
});

scaleshop_testkit::both!(
    a_payload_of_the_wrong_shape_is_parked_at_once,
    |backend| async move {
        let db = fresh(backend).await;
        // A v1 event whose payload is not a v1 parcel (written without a contract).
        let event = NewEvent::raw(
            "parcel.shipped",
            1,
            Uuid::now_v7(),
            serde_json::json!({"parcel_id": "nope"}),
        );
        let mut tx = db.begin().await.unwrap();
        scaleshop_events::append(&mut tx, &event).await.unwrap();
        tx.commit().await.unwrap();
        let fine = publish(
            &db,
            &first::ParcelShipped {
                parcel_id: Uuid::now_v7(),
                weight_grams: 1,
            },
        )
        .await;

        let consumer = Shipping::<first::ParcelShipped>::new();
        let running = start_consumers(&db, settings(), vec![consumer.clone()]).await;
        caught_up(&db).await;
        running.stop().await;
        let dead = DeadEvents::new(db.clone())
            .get(SHIPPING, event.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(dead.attempts, 1);
        assert!(
            dead.last_error
                .starts_with("bad parcel.shipped v1 payload: "),
            "{}",
            dead.last_error
        );
        let received: Vec<_> = consumer
            .received()
            .await
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(received, [fine]);
    }
);
