//! The search projection under kill -9: products are created and ordered (stock
//! reserved and sold: events that change a document by a delta) while the server
//! is killed mid-stream. After the restart the index catches up from its last
//! commit, every accepted product is found, and the index equals one rebuilt from
//! the whole log by `scaleshop projections rebuild` (same digest): nothing was
//! lost and no event was applied twice. (A product whose answer the kill cut off
//! after its commit exists too: the index holds every product the table holds.)
//!
//! The table projections (`product-listing`, `order-history`) under kill -9 in
//! the middle of a rebuild: the live tables, untouched by the rebuild, answer
//! reads before and after the kill; after the restart the rebuild is taken over
//! from the position its new copy reached and swapped in, and the tables end
//! with the same rows as before the rebuild (same digest and count).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use scaleshop_testkit::{Backend, both, fixture};
use serde_json::{Value, json};

use crate::process::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, Deployment, client};
use crate::saga_crash::{customer, product};

/// Creates products until `stop`; returns the skus the server accepted (201).
async fn create_products(
    base: String,
    admin: String,
    prefix: usize,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let http = client();
    let mut accepted = Vec::new();
    for n in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let sku = format!("KILL-{prefix}-{n}");
        let r = http
            .post(format!("{base}/v1/products"))
            .bearer_auth(&admin)
            .json(&json!({"sku": sku, "name": format!("Crashproof lamp {n}"),
                          "description": "Survives a kill", "price_cents": 100 + n,
                          "currency": "EUR", "initial_stock": 5}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 201 => accepted.push(sku),
            // The server is gone: this client is done.
            Err(_) => break,
            Ok(_) => {}
        }
    }
    accepted
}

/// Places orders (each reserves, then sells) until `stop`.
async fn place_orders(base: String, token: String, item: String, stop: Arc<AtomicBool>) {
    let http = client();
    for _ in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let r = http
            .post(format!("{base}/v1/orders"))
            .bearer_auth(&token)
            .json(&json!({"items": [{"product_id": item, "quantity": 1}], "payment_method": "pm_card_visa"}))
            .send()
            .await;
        if r.is_err() {
            break;
        }
    }
}

/// The skus of every page of a product list.
async fn skus(api: &Api, path: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let mut url = api.url(path);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = api
            .client
            .get(url)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("page");
        found.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .map(|p| p["sku"].as_str().expect("sku").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return found,
        }
    }
    panic!("{path}: paging does not end");
}

async fn projection(api: &Api, admin: &str) -> Value {
    let body: Value = api
        .client
        .get(api.url("/v1/projections"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("projections")
        .json()
        .await
        .expect("json");
    body["items"][0].clone()
}

both!(
    search_projection_catches_up_after_kill9_without_loss_or_double_apply,
    [sqlite, postgres],
    |backend: Backend| async move {
        let deployment = Deployment::fresh(backend).await;
        let server = deployment.start().await;
        let admin = server.admin_token().await;
        let item = product(&server, &admin, "KILL-ORDERED", 100_000).await;
        let buyer = customer(&server, "kill-search@example.com").await;

        let stop = Arc::new(AtomicBool::new(false));
        let makers: Vec<_> = (0..3)
            .map(|c| {
                tokio::spawn(create_products(
                    server.base.clone(),
                    admin.clone(),
                    c,
                    stop.clone(),
                ))
            })
            .collect();
        let buyers: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(place_orders(
                    server.base.clone(),
                    buyer.clone(),
                    item.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // Kill while products and orders stream in (the index commits batches
        // all along).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let lag_before_kill = projection(&server, &admin).await["lag"].clone();
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        let mut accepted = Vec::new();
        for m in makers {
            accepted.extend(m.await.expect("maker"));
        }
        for b in buyers {
            b.await.expect("buyer");
        }
        assert!(
            accepted.len() >= 10,
            "only {} products accepted",
            accepted.len()
        );

        let server = deployment.start().await;
        let admin = server.admin_token().await;
        // The sagas of the orders in flight finish (every job final, every event
        // delivered), then the index catches up and the log stands still.
        let started = Instant::now();
        let mut last: Option<Value> = None;
        let caught_up = loop {
            let status = projection(&server, &admin).await;
            let backlog = crate::process::gauge(&server, "outbox_backlog").await;
            let jobs = server.all(&admin, "/v1/jobs").await;
            let open = jobs
                .iter()
                .any(|j| j["state"] != "completed" && j["state"] != "dead");
            let settled =
                status["state"] == "live" && status["lag"] == 0 && backlog == Some(0.0) && !open;
            if settled
                && last
                    .as_ref()
                    .is_some_and(|l| l["position"] == status["position"])
            {
                break status;
            }
            last = settled.then_some(status.clone());
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "catches up: {status}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        // What the products table holds: every accepted product, and perhaps one
        // whose 201 the kill cut off after its commit.
        let made = skus(&server, "/v1/products?limit=100").await;
        assert_eq!(
            caught_up["documents"].as_u64(),
            Some(made.len() as u64),
            "every product is indexed once: {caught_up}"
        );
        let lamps: BTreeSet<String> = made.into_iter().filter(|s| s != "KILL-ORDERED").collect();
        for sku in &accepted {
            assert!(lamps.contains(sku), "accepted product {sku} was lost");
        }
        // Every product is found by a search.
        let found = skus(&server, "/v1/products?q=crashproof&sort=newest&limit=100").await;
        assert_eq!(found, lamps);

        // The index built across the kill equals one built from the whole log.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_scaleshop"))
            .args([
                "projections",
                "rebuild",
                "product-search",
                "--url",
                &server.base,
                "--wait-secs",
                "60",
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SCALESHOP_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("SCALESHOP_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("SCALESHOP_DATA_DIR", deployment.data_dir.join("cli"))
            .env("SCALESHOP_LOG_FILTER", "warn")
            .output()
            .expect("scaleshop projections rebuild");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rebuilt: Value =
            serde_json::from_slice(&output.stdout).expect("the rebuilt projection's state");
        assert_ne!(rebuilt["generation"], caught_up["generation"]);
        assert_eq!(
            rebuilt["digest"], caught_up["digest"],
            "{caught_up} {rebuilt}"
        );
        assert_eq!(rebuilt["position"], caught_up["position"]);
        eprintln!(
            "search kill -9: {} products accepted, lag {lag_before_kill} at the kill, caught up {:.2} s after the restart",
            accepted.len(),
            started.elapsed().as_secs_f64()
        );
    }
);

/// The table projections the rebuild test kills midway.
const TABLES: [&str; 2] = ["product-listing", "order-history"];

/// Projection `name` as `GET /v1/projections` shows it.
async fn named(api: &Api, admin: &str, name: &str) -> Value {
    let body: Value = api
        .client
        .get(api.url("/v1/projections"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("projections")
        .json()
        .await
        .expect("json");
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no projection {name}: {body}"))
}

/// Waits (at most `limit`) until every job is final, every event delivered, the
/// table projections are live without lag, and the log stood still between two
/// looks; their states then, in the order of [`TABLES`].
async fn settled_tables(api: &Api, admin: &str, limit: Duration) -> Vec<Value> {
    let started = Instant::now();
    let mut last: Option<Vec<Value>> = None;
    loop {
        let mut states = Vec::new();
        for name in TABLES {
            states.push(named(api, admin, name).await);
        }
        let backlog = crate::process::gauge(api, "outbox_backlog").await;
        let jobs = api.all(admin, "/v1/jobs").await;
        let open = jobs
            .iter()
            .any(|j| j["state"] != "completed" && j["state"] != "dead");
        let settled = !open
            && backlog == Some(0.0)
            && states.iter().all(|s| s["state"] == "live" && s["lag"] == 0);
        if settled
            && last.as_ref().is_some_and(|l| {
                l.iter()
                    .zip(&states)
                    .all(|(a, b)| a["position"] == b["position"])
            })
        {
            return states;
        }
        last = settled.then_some(states.clone());
        assert!(
            started.elapsed() < limit,
            "the table projections settle within {limit:?}: {states:?} backlog {backlog:?}, jobs open: {open}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Creates `count` products (`REBUILD-{prefix}-{n}`) and returns their ids.
async fn made_products(base: String, admin: String, prefix: usize, count: usize) -> Vec<String> {
    let http = client();
    let mut ids = Vec::new();
    for n in 0..count {
        let r = http
            .post(format!("{base}/v1/products"))
            .bearer_auth(&admin)
            .json(&json!({"sku": format!("REBUILD-{prefix}-{n}"), "name": format!("Rebuilt chair {n}"),
                          "description": "Read from the listing", "price_cents": 1000 + n,
                          "currency": "EUR", "initial_stock": 40}))
            .send()
            .await
            .expect("create product");
        assert_eq!(r.status().as_u16(), 201, "create product");
        let body: Value = r.json().await.expect("product");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    ids
}

/// The deployment's database, opened beside the server (SQLite in WAL mode lets
/// another process read while it writes).
async fn open_database(deployment: &Deployment) -> scaleshop_db::Database {
    scaleshop_db::Database::connect(
        deployment.database_url.as_deref(),
        &deployment.data_dir,
        &scaleshop_db::PoolSettings {
            min_connections: 0,
            ..Default::default()
        },
    )
    .await
    .expect("connect")
}

/// Where a consumer stands, if it exists: its position and the `rebuild_to` of
/// a rebuild's new copy.
async fn consumer_row(db: &scaleshop_db::Database, name: &str) -> Option<(i64, Option<i64>)> {
    scaleshop_db::with_pool!(db, pool => {
        scaleshop_db::sqlx::query_as(
            "SELECT position, rebuild_to FROM event_consumers WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await
        .expect("consumer")
    })
}

/// The read model that answered a product list (`X-Read-Model`).
async fn list_answered_by(api: &Api) -> String {
    let r = api
        .client
        .get(api.url("/v1/products?limit=100"))
        .send()
        .await
        .expect("list");
    assert_eq!(r.status().as_u16(), 200);
    r.headers()
        .get("x-read-model")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

// A rebuild of the table projections killed with SIGKILL midway: the live
// tables keep answering reads; after the restart the rebuilds are taken over
// and swapped in, both are live again with the rows they held before (digest,
// count), and the product list is read from the listing, every product once.
both!(
    a_table_projection_rebuild_killed_midway_resumes_to_the_same_rows,
    [sqlite, postgres],
    |backend: Backend| async move {
        let deployment = Deployment::fresh(backend).await;
        let server = deployment.start().await;
        let admin = server.admin_token().await;
        let begun = Instant::now();

        // Enough of a log that a rebuild takes a while: 400 products, price
        // changes, stock adjustments, and orders that reserve stock (some
        // declined, which releases it again). The events that move stock by a
        // delta come early in the log, so the rebuild is killed among them.
        let mut ids = made_products(server.base.clone(), admin.clone(), 0, 50).await;
        for (n, id) in ids.iter().enumerate() {
            for delta in [5, -7].into_iter().take(1 + usize::from(n % 3 == 0)) {
                let r = server
                    .client
                    .post(server.url(&format!("/v1/inventory/{id}/adjustments")))
                    .bearer_auth(&admin)
                    .json(&json!({"delta": delta, "reason": "stock count"}))
                    .send()
                    .await
                    .expect("adjust");
                assert_eq!(r.status().as_u16(), 200, "adjust stock");
            }
        }
        let buyer = customer(&server, "rebuild-midway@example.com").await;
        let orders = 30;
        for n in 0..orders {
            let method = if n % 5 == 4 {
                "pm_card_chargeDeclined"
            } else {
                "pm_card_visa"
            };
            let r = server
                .client
                .post(server.url("/v1/orders"))
                .bearer_auth(&buyer)
                .json(&json!({"items": [{"product_id": ids[n], "quantity": 2},
                                        {"product_id": ids[(n + 25) % 50], "quantity": 1}],
                              "payment_method": method}))
                .send()
                .await
                .expect("order");
            assert_eq!(r.status().as_u16(), 202, "place order");
        }
        // The rest of the products while the orders are processed.
        let makers: Vec<_> = (1..8)
            .map(|p| tokio::spawn(made_products(server.base.clone(), admin.clone(), p, 50)))
            .collect();
        for m in makers {
            ids.extend(m.await.expect("maker"));
        }
        assert_eq!(ids.len(), 400);
        for (n, id) in ids.iter().enumerate().step_by(10) {
            let r = server
                .client
                .patch(server.url(&format!("/v1/products/{id}")))
                .bearer_auth(&admin)
                .json(&json!({"price_cents": 2000 + n}))
                .send()
                .await
                .expect("patch");
            assert_eq!(r.status().as_u16(), 200, "patch product");
        }
        let before = settled_tables(&server, &admin, Duration::from_secs(60)).await;
        let made = begun.elapsed();
        assert_eq!(before[0]["documents"], 400, "{before:?}");
        assert_eq!(before[1]["documents"], orders, "{before:?}");

        // Rebuild both (the listing, with most of the log to apply, last), and
        // kill the process once the listing's new copy has applied a quarter of
        // the log: it then holds part of the rows, its inbox part of the events,
        // and what is left holds reservations and releases.
        let db = open_database(&deployment).await;
        let mut answered = Vec::new();
        for name in ["order-history", "product-listing"] {
            let r = server
                .client
                .post(server.url(&format!("/v1/projections/{name}/rebuild")))
                .bearer_auth(&admin)
                .send()
                .await
                .expect("rebuild");
            assert_eq!(r.status().as_u16(), 202, "rebuild {name}");
            answered.push(r.json::<Value>().await.expect("rebuild state"));
        }
        let waited = Instant::now();
        let mut answered_during = None;
        loop {
            let (position, rebuild_to) = consumer_row(&db, "product-listing.rebuild")
                .await
                .expect("the listing's new copy");
            if answered_during.is_none() {
                // The live listing answers while its new copy is built.
                answered_during = Some(list_answered_by(&server).await);
            }
            if position >= rebuild_to.expect("rebuild_to") / 4 {
                break;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "the listing's rebuild is stuck at {position}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.kill9();
        assert_eq!(answered_during.as_deref(), Some("projection"));
        for state in &answered {
            assert!(
                state["state"] == "rebuilding" || (state["state"] == "live" && state["lag"] == 0),
                "{state}"
            );
        }
        let at_kill = [
            consumer_row(&db, "order-history.rebuild").await,
            consumer_row(&db, "product-listing.rebuild").await,
        ];
        // The live copies were left as they were: at the positions they had.
        for (name, was) in TABLES.iter().zip(&before) {
            let (position, rebuild_to) = consumer_row(&db, name).await.expect("live consumer");
            assert_eq!(Some(position), was["position"].as_i64(), "{name}: {was}");
            assert_eq!(rebuild_to, None, "{name}");
        }
        let Some((position, rebuild_to)) = at_kill[1] else {
            panic!("the listing's new copy went before the kill: {at_kill:?}");
        };
        assert!(
            rebuild_to.is_some_and(|to| 0 < position && position < to),
            "the listing's rebuild was not cut midway: {at_kill:?}"
        );

        let server = deployment.start().await;
        let admin = server.admin_token().await;
        let restarted = Instant::now();
        // The live listing answers at once, while its rebuild is taken over.
        assert_eq!(list_answered_by(&server).await, "projection");
        let after = settled_tables(&server, &admin, Duration::from_secs(60)).await;
        let resumed = restarted.elapsed();
        for name in ["order-history.rebuild", "product-listing.rebuild"] {
            assert_eq!(
                consumer_row(&db, name).await,
                None,
                "{name} went at the swap"
            );
        }
        db.close().await;
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a["digest"], b["digest"], "{}: {b} then {a}", b["name"]);
            assert_eq!(
                a["documents"], b["documents"],
                "{}: {b} then {a}",
                b["name"]
            );
        }
        // The listing answers the product list again, every product once, with
        // the stock the command side holds.
        let mut listed = Vec::new();
        let mut available = std::collections::HashMap::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let mut url = server.url("/v1/products?limit=100");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let r = server.client.get(url).send().await.expect("list");
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(
                r.headers()
                    .get("x-read-model")
                    .and_then(|v| v.to_str().ok()),
                Some("projection")
            );
            let page: Value = r.json().await.expect("page");
            for item in page["items"].as_array().expect("items") {
                let id = item["id"].as_str().expect("id").to_owned();
                available.insert(id.clone(), item["available"].clone());
                listed.push(id);
            }
            cursor = page["next_cursor"].as_str().map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        assert!(cursor.is_none(), "paging does not end");
        let unique: BTreeSet<&String> = listed.iter().collect();
        assert_eq!(unique.len(), listed.len(), "a product is listed twice");
        assert_eq!(unique, ids.iter().collect::<BTreeSet<_>>());
        // The products whose stock was adjusted, reserved and released.
        for id in &ids[..50] {
            let stock = server
                .get_json(&format!("/v1/inventory/{id}"), None)
                .await
                .expect("stock");
            assert_eq!(available[id], stock["available"], "{id}: {stock}");
        }
        eprintln!(
            "rebuild kill -9 ({backend:?}): data made and settled in {:.2} s; at the kill (position, rebuild_to) of order-history {:?}, product-listing {:?}; resumed in {:.2} s",
            made.as_secs_f64(),
            at_kill[0],
            at_kill[1],
            resumed.as_secs_f64()
        );
    }
);
