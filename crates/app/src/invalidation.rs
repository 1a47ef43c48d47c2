//! Which cache entries an event makes stale. The event log is the second path of
//! cache invalidation (after Redis pub/sub): every process follows it, so an entry
//! whose broadcast was lost is still dropped.

use std::sync::Arc;

use scaleshop_cache::{Invalidate, TieredCache};
use scaleshop_catalog::ProductView;
use scaleshop_contracts::{
    ImageAdded, ImageProcessed, InventoryAdjusted, InventoryReleased, InventoryReserved,
    InventorySold, ProductCreated, ProductUpdated, SessionEnded, StockLine, UserCreated,
    UserUpdated,
};
use scaleshop_db::Tx;
use scaleshop_events::{Consumer, Contract, DecodeError, Event, HandlerError};
use uuid::Uuid;

/// The caches the event log keeps fresh.
pub struct Caches<'a> {
    pub users: &'a dyn Invalidate,
    pub products: &'a dyn Invalidate,
    /// The state of each user's sessions (keyed by user id).
    pub sessions: &'a dyn Invalidate,
}

fn lines(items: &[StockLine]) -> Vec<Uuid> {
    items.iter().map(|i| i.product_id).collect()
}

/// The products whose stock or images `event` changed (`None`: not such an
/// event). Their cached views carry `available` and the image variants.
fn products_changed(event: &Event) -> Option<Result<Vec<Uuid>, DecodeError>> {
    Some(match event.kind.as_str() {
        InventoryAdjusted::NAME => event
            .decode::<InventoryAdjusted>()
            .map(|e| vec![e.product_id]),
        ImageAdded::NAME => event.decode::<ImageAdded>().map(|e| vec![e.product_id]),
        ImageProcessed::NAME => event.decode::<ImageProcessed>().map(|e| vec![e.product_id]),
        InventoryReserved::NAME => event.decode::<InventoryReserved>().map(|e| lines(&e.items)),
        InventoryReleased::NAME => event.decode::<InventoryReleased>().map(|e| lines(&e.items)),
        InventorySold::NAME => event.decode::<InventorySold>().map(|e| lines(&e.items)),
        _ => return None,
    })
}

/// Drops the L1 entries `event` makes stale. Events keyed by their aggregate
/// need only their name; the others are read through their contracts. One this
/// build cannot read (a newer version) is logged and drops nothing: the entry
/// lives until its TTL.
pub fn on_event(event: &Event, caches: &Caches<'_>) {
    let Caches {
        users,
        products,
        sessions,
    } = *caches;
    let aggregate = || event.aggregate_id.to_string();
    match event.kind.as_str() {
        UserCreated::NAME => users.invalidate_local(&aggregate()),
        // An update may be a new password (a new session epoch).
        UserUpdated::NAME => {
            let user = aggregate();
            users.invalidate_local(&user);
            sessions.invalidate_local(&user);
        }
        SessionEnded::NAME => sessions.invalidate_local(&aggregate()),
        ProductCreated::NAME | ProductUpdated::NAME => products.invalidate_local(&aggregate()),
        _ => match products_changed(event) {
            Some(Ok(ids)) => {
                for id in ids {
                    products.invalidate_local(&id.to_string());
                }
            }
            Some(Err(error)) => {
                tracing::warn!(event_id = %event.id, %error, "cache invalidation cannot read the event");
            }
            None => {}
        },
    }
}

/// The consumer that drops the shared (Redis) copy of a product's view when its
/// stock or images change. The product's own writes drop it where they happen
/// (the catalog); stock and images change in other services, which know no
/// cache, so their events do it: once per event for the whole deployment (a
/// durable consumer), then every process drops its L1 copy on the broadcast (and
/// again from the event log). Registered only where there is a Redis tier.
pub struct ProductCacheConsumer {
    pub cache: Arc<TieredCache<ProductView>>,
}

/// Its name: the key of its position.
pub const PRODUCT_CACHE_CONSUMER: &str = "catalog.cache";

#[async_trait::async_trait]
impl Consumer for ProductCacheConsumer {
    fn name(&self) -> &'static str {
        PRODUCT_CACHE_CONSUMER
    }

    fn wants(&self, event_type: &str) -> bool {
        matches!(
            event_type,
            InventoryAdjusted::NAME
                | ImageAdded::NAME
                | ImageProcessed::NAME
                | InventoryReserved::NAME
                | InventoryReleased::NAME
                | InventorySold::NAME
        )
    }

    async fn handle(&self, event: &Event, _tx: &mut Tx) -> Result<(), HandlerError> {
        match products_changed(event) {
            Some(Ok(ids)) => {
                for id in ids {
                    self.cache.invalidate(&id.to_string()).await;
                }
                Ok(())
            }
            Some(Err(error)) => Err(HandlerError::from(error)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use scaleshop_db::sqlx::types::Json;

    use super::*;

    #[derive(Default)]
    struct Seen(RwLock<Vec<String>>);

    impl Invalidate for Seen {
        fn name(&self) -> &'static str {
            "seen"
        }

        fn invalidate_local(&self, key: &str) {
            if let Ok(mut keys) = self.0.write() {
                keys.push(key.to_owned());
            }
        }
    }

    fn event<C: Contract>(aggregate: Uuid, payload: &C) -> Event {
        Event {
            id: Uuid::now_v7(),
            sequence: 1,
            kind: C::NAME.to_owned(),
            version: 1,
            aggregate_id: aggregate,
            occurred_at: chrono::Utc::now(),
            data: Json(payload.encode().unwrap()),
            traceparent: None,
        }
    }

    #[test]
    fn events_map_to_keys() {
        let (users, products, sessions) = (Seen::default(), Seen::default(), Seen::default());
        let caches = Caches {
            users: &users,
            products: &products,
            sessions: &sessions,
        };
        let (u, p, o, v) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        let user = UserUpdated {
            user_id: u,
            email: "a@example.com".into(),
            name: "A".into(),
            role: "customer".into(),
            changed: vec!["password".into()],
        };
        on_event(&event(u, &user), &caches);
        let items = vec![StockLine {
            product_id: p,
            quantity: 1,
        }];
        on_event(&event(o, &InventorySold { order_id: o, items }), &caches);
        let adjusted = InventoryAdjusted {
            product_id: p,
            delta: 3,
            reason: "count".into(),
            available: 3,
        };
        on_event(&event(p, &adjusted), &caches);
        let created = scaleshop_contracts::OrderCancelled {
            order_id: o,
            user_id: u,
            at: None,
        };
        on_event(&event(o, &created), &caches);
        let ended = SessionEnded {
            user_id: v,
            session_id: Uuid::now_v7(),
        };
        on_event(&event(v, &ended), &caches);
        // A version this build cannot read: nothing for a payload-keyed event,
        // the aggregate's entry for a name-keyed one.
        let mut newer = event(
            o,
            &InventorySold {
                order_id: o,
                items: vec![],
            },
        );
        newer.version = 2;
        on_event(&newer, &caches);
        let mut newer = event(v, &ended);
        newer.version = 2;
        on_event(&newer, &caches);
        assert_eq!(users.0.read().unwrap().clone(), vec![u.to_string()]);
        assert_eq!(
            sessions.0.read().unwrap().clone(),
            vec![u.to_string(), v.to_string(), v.to_string()]
        );
        assert_eq!(
            products.0.read().unwrap().clone(),
            vec![p.to_string(), p.to_string()]
        );
    }
}
