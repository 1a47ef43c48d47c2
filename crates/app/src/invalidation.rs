//! Which cache entries an event makes stale. The event log is the second path of
//! cache invalidation (after Redis pub/sub): every process follows it, so an entry
//! whose broadcast was lost is still dropped.

use scaleshop_cache::Invalidate;
use scaleshop_events::Event;

/// The caches the event log keeps fresh.
pub struct Caches<'a> {
    pub users: &'a dyn Invalidate,
    pub products: &'a dyn Invalidate,
    /// The state of each user's sessions (keyed by user id).
    pub sessions: &'a dyn Invalidate,
}

/// Drops the L1 entries `event` makes stale.
pub fn on_event(event: &Event, caches: &Caches<'_>) {
    let Caches {
        users,
        products,
        sessions,
    } = *caches;
    let data = &event.data.0;
    let id_field = |name: &str| data.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    match event.kind.as_str() {
        "user.created" => users.invalidate_local(&event.aggregate_id.to_string()),
        // An update may be a new password (a new session epoch).
        "user.updated" => {
            let user = event.aggregate_id.to_string();
            users.invalidate_local(&user);
            sessions.invalidate_local(&user);
        }
        "session.ended" => sessions.invalidate_local(&event.aggregate_id.to_string()),
        "product.created" | "product.updated" => {
            products.invalidate_local(&event.aggregate_id.to_string())
        }
        "inventory.adjusted" | "image.processed" => {
            if let Some(product) = id_field("product_id") {
                products.invalidate_local(&product);
            }
        }
        "inventory.reserved" | "inventory.released" | "inventory.sold" => {
            let items = data.get("items").and_then(|v| v.as_array());
            for product in items
                .into_iter()
                .flatten()
                .filter_map(|i| i.get("product_id")?.as_str())
            {
                products.invalidate_local(product);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use scaleshop_db::sqlx::types::Json;
    use serde_json::json;
    use uuid::Uuid;

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

    fn event(kind: &str, aggregate: Uuid, data: serde_json::Value) -> Event {
        Event {
            id: Uuid::now_v7(),
            sequence: 1,
            kind: kind.to_owned(),
            version: 1,
            aggregate_id: aggregate,
            occurred_at: chrono::Utc::now(),
            data: Json(data),
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
        on_event(&event("user.updated", u, json!({})), &caches);
        on_event(
            &event(
                "inventory.sold",
                o,
                json!({"items": [{"product_id": p.to_string()}]}),
            ),
            &caches,
        );
        on_event(
            &event(
                "inventory.adjusted",
                p,
                json!({"product_id": p.to_string()}),
            ),
            &caches,
        );
        on_event(&event("order.created", o, json!({})), &caches);
        on_event(&event("session.ended", v, json!({})), &caches);
        assert_eq!(users.0.read().unwrap().clone(), vec![u.to_string()]);
        assert_eq!(
            sessions.0.read().unwrap().clone(),
            vec![u.to_string(), v.to_string()]
        );
        assert_eq!(
            products.0.read().unwrap().clone(),
            vec![p.to_string(), p.to_string()]
        );
    }
}
